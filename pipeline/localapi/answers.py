"""What the local API answers: a deterministic function of the messages, billed like the AIML API.

Resume, dedup and the kill test compare runs answer by answer, so an answer must depend on the
messages only, never on timing, attempt or order: the label, the sentence and the schema document
are all drawn from the hash ``validation.parse`` computed. Media parts are echoed as ``[image:<id>]``
tokens so a test can check which file reached which row. ``max_tokens`` is applied the way reasoning
models spend it (reasoning first, then content), and ``meta.usage`` carries credits and USD in the
AIML API's shape, with credits per dollar from ``pipeline.answers.costs``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from pipeline.answers.costs import CREDITS_PER_USD
from pipeline.localapi.documents import SchemaDocuments
from pipeline.localapi.validation import EFFORTS, TOKEN_RE, Parsed, count_tokens

_LABELS = ("positive", "negative", "neutral")
_SENTENCES = (
    "The wording states its point plainly.",
    "Tone and word choice point the same way.",
    "Most of the cues agree with this reading.",
    "A few phrases are mixed, but the overall lean is clear.",
    "The key sentence carries the judgement.",
    "Nothing in the text contradicts this reading.",
    "The text is short but unambiguous.",
    "The surrounding context supports this label.",
)
_THOUGHTS = (
    "Let me read the request carefully before answering.",
    "The user wants a short, direct answer.",
    "I should look at the tone of the key sentences first.",
    "Some words lean one way, a few lean the other.",
    "Weighing them, one reading is clearly stronger.",
    "I should not overthink the edge cases here.",
    "The instructions ask for a compact format, so I will keep it brief.",
    "Let me double-check that nothing contradicts this.",
)
_REFUSAL = "I'm sorry, but I can't help with that request."
_SCHEMA_BUCKETS = 16  # distinct documents per schema: enough variety, and the cache stays small


@dataclass(slots=True)
class Answer:
    """One assistant message before it is serialized; mutable so faults and truncation can edit it."""

    content: str | None
    reasoning: str | None
    refusal: str | None = None
    finish_reason: str = "stop"
    content_tokens: int = 0
    reasoning_tokens: int = 0
    tool_calls: list[dict[str, str]] | None = None
    """``{id, name, arguments}`` per function call; their arguments are the completion's text."""
    erred: bool = False
    """A field was made wrong on purpose (``truth.apply``): its token log-probabilities are low."""

    def set_content(self, text: str) -> None:
        self.content = text
        self.content_tokens = count_tokens(text)

    def set_arguments(self, index: int, text: str) -> None:
        assert self.tool_calls is not None
        self.tool_calls[index]["arguments"] = text
        self.content_tokens = sum(count_tokens(c["arguments"]) for c in self.tool_calls)


def refusal() -> Answer:
    return Answer(None, None, _REFUSAL, content_tokens=count_tokens(_REFUSAL))


class Answerer:
    """Builds answers; owns the schema-document cache, so one per server."""

    def __init__(self) -> None:
        self.documents = SchemaDocuments()

    def answer(self, parsed: Parsed) -> Answer:
        """The deterministic answer: a function of the messages only, never of timing or attempt."""
        h = int.from_bytes(parsed.digest[:8], "big")
        reasoning = None
        r_tokens = 0
        if parsed.effort is not None:
            n = EFFORTS[parsed.effort]
            reasoning = " ".join(_THOUGHTS[(h + 3 * i) % len(_THOUGHTS)] for i in range(n))
            r_tokens = count_tokens(reasoning)
        label = _LABELS[h % 3]
        sentence = _SENTENCES[(h >> 8) % len(_SENTENCES)]
        media = " ".join(parsed.media)
        calls = self.calls(parsed, h, media)
        if calls:
            tokens = sum(count_tokens(c["arguments"]) for c in calls)
            return Answer(None, reasoning, None, "tool_calls", tokens, r_tokens, calls)
        if parsed.fmt == "text":
            content = f"{label}. {sentence}" + (f" {media}" if media else "")
        elif parsed.fmt == "json_object":
            content = orjson.dumps({"answer": f"{label}. {sentence}" + (f" {media}" if media else "")}).decode()
        else:
            assert parsed.schema is not None
            content = self.documents.get(parsed.schema, h % _SCHEMA_BUCKETS, media)
        return Answer(content, reasoning, content_tokens=count_tokens(content), reasoning_tokens=r_tokens)

    def calls(self, parsed: Parsed, h: int, media: str) -> list[dict[str, str]]:
        """The function calls of this answer: the forced function, else (``required``, or three ``auto``
        answers in four) one chosen by the hash, and a second one when parallel calls are allowed and the
        hash says so. Arguments are a document valid against the function's parameters."""
        tools = parsed.tools
        if not tools or parsed.tool_choice == "none" or (parsed.tool_choice == "auto" and h % 4 == 0):
            return []
        names = list(tools)
        chosen = [parsed.forced] if parsed.forced else [names[(h >> 4) % len(names)]]
        if not parsed.forced and parsed.parallel and len(names) > 1 and (h >> 12) % 2:
            chosen.append(names[((h >> 4) + 1) % len(names)])
        out = []
        for i, name in enumerate(chosen):
            assert name is not None
            arguments = self.documents.get(tools[name], (h >> (16 + i)) % _SCHEMA_BUCKETS, media if i == 0 else "")
            out.append({"id": f"call_{parsed.digest[:6].hex()}{i}", "name": name, "arguments": arguments})
        return out


def _cut(text: str, tokens: int) -> str:
    """The prefix of ``text`` holding its first ``tokens`` tokens, as a model stopped mid-answer."""
    if tokens <= 0:
        return ""
    for i, match in enumerate(TOKEN_RE.finditer(text), 1):
        if i == tokens:
            return text[: match.end()]
    return text


def truncate(answer: Answer, max_tokens: int | None) -> None:
    """Apply ``max_tokens`` the way reasoning models spend it: reasoning first, then content."""
    if max_tokens is None or answer.content_tokens + answer.reasoning_tokens <= max_tokens:
        return
    answer.finish_reason = "length"
    if answer.reasoning is not None and answer.reasoning_tokens >= max_tokens:
        answer.reasoning = _cut(answer.reasoning, max_tokens)
        answer.reasoning_tokens = max_tokens
        answer.content, answer.content_tokens, answer.tool_calls = "", 0, None
        return
    left = max_tokens - answer.reasoning_tokens
    if answer.tool_calls:  # a call cut mid-arguments, and no later call
        kept: list[dict[str, str]] = []
        for call in answer.tool_calls:
            n = count_tokens(call["arguments"])
            kept.append({**call, "arguments": _cut(call["arguments"], min(n, left))})
            left -= n
            if left <= 0:
                break
        answer.tool_calls = kept
    else:
        answer.content = _cut(answer.content or "", left)
    answer.content_tokens = max_tokens - answer.reasoning_tokens


def usd_for(prompt_tokens: int, completion_tokens: int, input_per_million: float, output_per_million: float) -> float:
    return round(prompt_tokens * input_per_million / 1e6 + completion_tokens * output_per_million / 1e6, 12)


def completion(response_id: str, model: str, prompt_tokens: int, answer: Answer, usd: float) -> dict[str, Any]:
    """The ``chat.completion`` object, with OpenAI's ``usage`` and the AIML API's ``meta.usage``."""
    completion_tokens = answer.content_tokens + answer.reasoning_tokens
    message: dict[str, Any] = {"role": "assistant", "content": answer.content}
    if answer.reasoning is not None:
        message["reasoning_content"] = answer.reasoning
    message["refusal"] = answer.refusal
    if answer.tool_calls:
        message["tool_calls"] = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in answer.tool_calls
        ]
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "service_tier": "default",
        "choices": [{"index": 0, "message": message, "finish_reason": answer.finish_reason, "logprobs": None}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": answer.reasoning_tokens},
        },
        "meta": {"usage": {"credits_used": round(usd * CREDITS_PER_USD), "usd_spent": usd}},
    }
