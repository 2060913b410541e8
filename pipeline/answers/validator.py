"""Judge a 200 answer: refusal, truncation, JSON, schema, function calls. Pure: no I/O, no clock.

A function call's ``arguments`` are judged like a JSON answer: parsed (fence tolerated), then checked
against that function's ``parameters``. When the job forces one function, its arguments *are* the
answer's document: an accepted call puts them in ``content``, exactly where a ``json_schema`` answer's
document goes, so typed columns and re-asks work the same for both.

A request may also carry its own functions (an OpenAI Batch line's ``tools`` and ``tool_choice``): its
answer is judged against those (``request_rules``), and a call is the answer, kept as the server sent it.

Where the server returns token log-probabilities (``choices[0].logprobs.content[*].logprob``, OpenAI's
shape, sent when the job asks with ``[model.extra] logprobs = true``), the answer's ``confidence`` is
the mean token probability ``exp(logprob)`` over its content tokens (``confidence_of``).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from pipeline.records import Reply, ToolCall, Usage

_FENCE = re.compile(r"^\s*```(?:json|JSON)?\s*\n(.*?)\n?\s*```\s*$", re.S)

SchemaCheck = Callable[[object], "str | None"]


@dataclass(frozen=True, slots=True)
class Judgement:
    """One attempt's verdict; ``sending.attempts.Attempts`` folds a row's attempts into its ``Outcome``."""

    status: str
    content: str | None
    reasoning_content: str | None
    finish_reason: str | None
    model: str | None
    response_id: str | None
    usage: Usage
    error: str | None = None
    tool_calls: tuple[ToolCall, ...] | None = None
    created: int | None = None
    refusal: str | None = None
    request_id: str | None = None
    confidence: float | None = None


@dataclass(frozen=True, slots=True)
class CallRules:
    """What a job accepts as function calls: the functions it sent, the one it forces, or "required"."""

    checks: Mapping[str, SchemaCheck | None] = field(default_factory=dict)
    """Every function the job sent, by name, with the check of its ``parameters``."""
    forced: str | None = None
    """The function whose arguments are the answer's document (``tool_choice`` names it)."""
    required: bool = False
    """``tool_choice = "required"``: an answer that calls no function is invalid."""


#: The key whose presence in a sent body means the request offered its own functions (a JSON key in
#: bytes: a message text holding the word is escaped, ``\"tools\"``, and never matches).
_TOOLS_KEY = b'"tools"'


def request_rules(sent: bytes | None) -> CallRules | None:
    """The rules for an answer to a request that offered its own functions (a Batch line's body), or None.

    ``tool_choice`` naming a function or ``"required"`` makes a call required; a forced function is the only
    one accepted. Arguments are checked against each function's ``parameters`` (a schema that cannot be
    compiled checks nothing: the server, not seedbatch, judged the request).
    """
    if sent is None or _TOOLS_KEY not in sent:
        return None
    try:
        body = orjson.loads(sent)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("tools"), list) or not body["tools"]:
        return None
    return _rules_for(orjson.dumps([body["tools"], body.get("tool_choice")]))


@functools.lru_cache(maxsize=64)
def _rules_for(key: bytes) -> CallRules | None:
    """Rules for one ``[tools, tool_choice]`` pair: a Batch file repeats a few, so each compiles once."""
    from pipeline.job.schema_types import compile_validator

    tools, choice = orjson.loads(key)
    if choice == "none":
        return None
    checks: dict[str, SchemaCheck | None] = {}
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            continue
        params = fn.get("parameters")
        try:
            checks[fn["name"]] = compile_validator(params) if isinstance(params, dict) else None
        except Exception:  # a broken schema: arguments are still parsed as a JSON object
            checks[fn["name"]] = None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        return CallRules(checks={name: checks.get(name)}, required=True)
    return CallRules(checks=checks, required=choice == "required")


def tool_calls_of(message: Mapping[str, Any]) -> tuple[ToolCall, ...] | None:
    """The message's function calls as sent (a malformed entry keeps what it has, as empty text)."""
    raw = message.get("tool_calls")
    if not isinstance(raw, list) or not raw:
        return None
    calls: list[ToolCall] = []
    for raw_item in raw:
        item: dict[str, Any] = raw_item if isinstance(raw_item, dict) else {}
        fn_raw = item.get("function")
        fn: dict[str, Any] = fn_raw if isinstance(fn_raw, dict) else {}
        ident, name, arguments = item.get("id"), fn.get("name"), fn.get("arguments")
        if isinstance(arguments, dict):  # a lenient server sends an object: keep it as the JSON it means
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append(
            ToolCall(
                ident if isinstance(ident, str) else "",
                name if isinstance(name, str) else "",
                arguments if isinstance(arguments, str) else "",
            )
        )
    return tuple(calls)


def _call_problem(call: ToolCall, check: SchemaCheck | None) -> tuple[str | None, str | None]:
    """(problem, the arguments as strict JSON) for one call."""
    try:
        doc, document = read_document(call.arguments)
    except ValueError as exc:
        reason = str(exc).removeprefix("answer is not valid JSON ")
        return f"arguments of {call.name} are not valid JSON {reason}", None
    if not isinstance(doc, dict):
        return f"arguments of {call.name} are JSON but not an object ({type(doc).__name__})", None
    if check is not None:
        problem = check(doc)
        if problem:
            return f"arguments of {call.name} did not match its parameters {problem}", None
    return None, document


def _int(x: Any) -> int | None:
    return int(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _float(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def confidence_of(choice: Mapping[str, Any]) -> float | None:
    """The mean probability of the answer's content tokens, from ``logprobs.content[*].logprob``.

    The mean of the probabilities, not their product (the probability of the whole answer): the product
    falls with every token, so a long right answer would score below a short wrong one and no single
    threshold (``when_confidence_below``) would fit rows of different lengths. The mean stays in [0, 1]
    whatever the length, and a few unsure tokens pull it down. ``logprobs.refusal`` (a refusal's tokens)
    is not the answer's content and is not counted. None when the server sent no content token log-probs.
    """
    logprobs = choice.get("logprobs")
    tokens = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(tokens, list):
        return None
    values = [_float(t.get("logprob")) for t in tokens if isinstance(t, dict)]
    probabilities = [math.exp(min(v, 0.0)) for v in values if v is not None and not math.isnan(v)]
    if not probabilities:
        return None
    return sum(probabilities) / len(probabilities)


def parse_usage(data: dict[str, Any]) -> Usage:
    """Usage as reported; fields a server leaves out stay ``None`` (never guessed here)."""
    u = data.get("usage") or {}
    if not isinstance(u, dict):
        u = {}
    prompt_details = u.get("prompt_tokens_details") or {}
    completion_details = u.get("completion_tokens_details") or {}
    meta = data.get("meta") or {}
    meta_usage = meta.get("usage") if isinstance(meta, dict) else None
    meta_usage = meta_usage if isinstance(meta_usage, dict) else {}
    prompt, completion = _int(u.get("prompt_tokens")), _int(u.get("completion_tokens"))
    total = _int(u.get("total_tokens"))
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total,
        reasoning_tokens=_int(completion_details.get("reasoning_tokens"))
        if isinstance(completion_details, dict)
        else None,
        cached_tokens=_int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else None,
        credits_used=_float(meta_usage.get("credits_used")),
        usd_spent=_float(meta_usage.get("usd_spent")),
    )


def strip_fence(text: str) -> str:
    """Models sometimes wrap JSON in a Markdown fence; that is harmless and removed."""
    m = _FENCE.match(text)
    return m.group(1) if m else text


def parse_document(content: str) -> Any:
    """The JSON document in an answer (fence tolerated); raises ``ValueError`` when there is none."""
    return read_document(content)[0]


def read_document(content: str) -> tuple[Any, str]:
    """The document and its text as strict JSON: the answer without a fence, or re-written when needed.

    A raw newline or tab inside a string (strict JSON wants ``\\n``) is the one leniency: its meaning is
    unambiguous, and grammar servers let models write it (llama.cpp's bounded-string rule allows control
    characters). Such a document is accepted and its text re-written, so ``json.loads(content)`` works.
    """
    text = strip_fence(content).strip()
    try:
        return orjson.loads(text), text
    except orjson.JSONDecodeError as exc:
        try:
            doc = json.loads(text, strict=False)
        except ValueError:
            raise ValueError(f"answer is not valid JSON ({exc})") from None
        return doc, json.dumps(doc, ensure_ascii=False)


def judge(reply: Reply, *, expects_json: bool, check: SchemaCheck | None, calls: CallRules | None = None) -> Judgement:
    """One attempt's verdict. ``check`` validates the answer's document: the content of a JSON answer, or
    the forced function's arguments when ``calls.forced`` is set."""
    data = reply.data
    choice = data["choices"][0] if isinstance(data["choices"][0], dict) else {}
    message = choice.get("message") or {}
    content = message.get("content")
    if isinstance(content, list):  # content parts: keep the text ones
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    reasoning = message.get("reasoning_content")
    finish = choice.get("finish_reason")
    text = content if isinstance(content, str) else None
    refusal = message.get("refusal")
    base = Judgement(
        status="ok",
        content=text,
        reasoning_content=reasoning if isinstance(reasoning, str) else None,
        finish_reason=finish if isinstance(finish, str) else None,
        model=data.get("model") if isinstance(data.get("model"), str) else None,
        response_id=data.get("id") if isinstance(data.get("id"), str) else None,
        usage=parse_usage(data),
        tool_calls=tool_calls_of(message),
        created=_int(data.get("created")),
        refusal=refusal if isinstance(refusal, str) else None,
        request_id=reply.request_id,
        confidence=confidence_of(choice),
    )

    def verdict(status: str, error: str | None = None) -> Judgement:
        return replace(base, status=status, error=error)

    if isinstance(refusal, str) and refusal.strip():
        return verdict("refused", f"model refused: {refusal.strip()[:300]}")
    if finish == "content_filter":
        return verdict("refused", "answer stopped by the provider's content filter")
    if calls is None:
        calls = request_rules(reply.sent)
    if calls is not None:
        judged = _judge_calls(base, calls, check)
        if judged is not None:
            return judged
    if not expects_json:
        if text is None:
            return verdict("invalid_output", "answer has no content")
        return verdict("ok")
    if finish == "length":
        return verdict("truncated", "answer cut off at max_tokens (finish_reason=length)")
    if text is None:
        return verdict("invalid_output", "answer has no content")
    try:
        doc, document = read_document(text)
    except ValueError as exc:
        return verdict("invalid_output", str(exc))
    if not isinstance(doc, dict):
        return verdict("invalid_output", f"answer is JSON but not an object ({type(doc).__name__})")
    if check is not None:
        problem = check(doc)
        if problem:
            return verdict("invalid_output", f"answer did not match schema {problem}")
    # ``content`` of an accepted answer is the document itself, so json.loads(content) works on every ok
    # row; a Markdown fence around it is dropped (a rejected answer keeps its raw text for diagnosis).
    return replace(base, content=document)


def _judge_calls(base: Judgement, rules: CallRules, check: SchemaCheck | None) -> Judgement | None:
    """The verdict on an answer to a job that sent functions; None: judge it as a plain answer."""
    calls = base.tool_calls or ()
    truncated = base.finish_reason == "length"
    if rules.forced is not None:
        if truncated:
            return replace(base, status="truncated", error="answer cut off at max_tokens (finish_reason=length)")
        call = next((c for c in calls if c.name == rules.forced), None)
        if call is None:
            called = ", ".join(repr(c.name) for c in calls) or "no function"
            return replace(
                base,
                status="invalid_output",
                error=f"the answer called {called}, not {rules.forced} (model.tool_choice forces it)",
            )
        problem, document = _call_problem(call, check)
        if problem is not None:
            return replace(base, status="invalid_output", error=problem)
        return replace(base, status="ok", content=document)
    if not calls:
        if rules.required:
            return replace(
                base, status="invalid_output", error="the answer called no function (model.tool_choice = 'required')"
            )
        return None
    if truncated:
        return replace(base, status="truncated", error="answer cut off at max_tokens (finish_reason=length)")
    for call in calls:
        if call.name not in rules.checks:
            known = ", ".join(rules.checks)
            error = f"the answer called {call.name!r}, not one of the functions sent ({known})"
            return replace(base, status="invalid_output", error=error)
        problem, _ = _call_problem(call, rules.checks[call.name])
        if problem is not None:
            return replace(base, status="invalid_output", error=problem)
    return replace(base, status="ok")
