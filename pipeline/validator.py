"""Judge a 200 answer: refusal, truncation, JSON, schema. Pure: no I/O, no clock."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import orjson

from pipeline.records import Reply, Usage

_FENCE = re.compile(r"^\s*```(?:json|JSON)?\s*\n(.*?)\n?\s*```\s*$", re.S)

SchemaCheck = Callable[[object], "str | None"]


@dataclass(frozen=True, slots=True)
class Judgement:
    """One attempt's verdict; the runner folds attempts into an ``Outcome``."""

    status: str
    content: str | None
    reasoning_content: str | None
    finish_reason: str | None
    model: str | None
    response_id: str | None
    usage: Usage
    error: str | None = None


def _int(x: Any) -> int | None:
    return int(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _float(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


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


def judge(reply: Reply, *, expects_json: bool, check: SchemaCheck | None) -> Judgement:
    data = reply.data
    choice = data["choices"][0] if isinstance(data["choices"][0], dict) else {}
    message = choice.get("message") or {}
    content = message.get("content")
    if isinstance(content, list):  # content parts: keep the text ones
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    reasoning = message.get("reasoning_content")
    finish = choice.get("finish_reason")
    text = content if isinstance(content, str) else None
    base = Judgement(
        status="ok",
        content=text,
        reasoning_content=reasoning if isinstance(reasoning, str) else None,
        finish_reason=finish if isinstance(finish, str) else None,
        model=data.get("model") if isinstance(data.get("model"), str) else None,
        response_id=data.get("id") if isinstance(data.get("id"), str) else None,
        usage=parse_usage(data),
    )

    def verdict(status: str, error: str | None = None) -> Judgement:
        return replace(base, status=status, error=error)

    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal.strip():
        return verdict("refused", f"model refused: {refusal.strip()[:300]}")
    if finish == "content_filter":
        return verdict("refused", "answer stopped by the provider's content filter")
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
