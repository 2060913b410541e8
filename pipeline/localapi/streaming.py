"""``stream: true`` answers: one finished ``chat.completion`` cut into server-sent events.

The chunks follow OpenAI's (and the AIML API reference's) ``chat.completion.chunk`` shape: a first chunk
with the role, deltas of ``reasoning_content`` then ``content`` then each tool call (id and name, then its
``arguments`` in pieces), a chunk carrying ``finish_reason``, and,
when ``stream_options.include_usage`` is set, a last chunk with empty ``choices`` and the ``usage`` (and
the AIML API's ``meta``). ``data: [DONE]`` closes the stream. Built from the same answer a plain request
gets, so a client that reassembles the stream must arrive at the same content, reasoning and usage.
"""

from __future__ import annotations

from typing import Any

import orjson

#: Content and reasoning are each sent in about this many deltas (more chunks, more chances to stall).
PIECES = 4


def _split(text: str, pieces: int) -> list[str]:
    if not text:
        return []
    step = max(1, -(-len(text) // pieces))
    return [text[i : i + step] for i in range(0, len(text), step)]


def events(data: dict[str, Any], include_usage: bool, pieces: int = PIECES) -> list[bytes]:
    """The SSE lines (each ``data: …\\n\\n``) for the answer ``data``, in sending order."""
    head: dict[str, Any] = {k: data[k] for k in ("id", "created", "model") if k in data}
    head["object"] = "chat.completion.chunk"
    choice = data["choices"][0]
    message = choice["message"]

    def chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> bytes:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        return b"data: " + orjson.dumps({**head, "choices": choices, **extra}) + b"\n\n"

    out = [chunk({"role": "assistant", "content": ""})]
    for piece in _split(message.get("reasoning_content") or "", pieces):
        out.append(chunk({"reasoning_content": piece}))
    for piece in _split(message.get("content") or "", pieces):
        out.append(chunk({"content": piece}))
    if message.get("refusal"):
        out.append(chunk({"refusal": message["refusal"]}))
    for index, call in enumerate(message.get("tool_calls") or []):
        # A call's id and name come once, its arguments in pieces keyed by the call's index.
        function = call["function"]
        head_delta = {"index": index, "id": call["id"], "type": call.get("type", "function")}
        out.append(chunk({"tool_calls": [{**head_delta, "function": {"name": function["name"], "arguments": ""}}]}))
        for piece in _split(function.get("arguments") or "", pieces):
            out.append(chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}))
    out.append(chunk({}, choice["finish_reason"]))
    if include_usage:
        extra = {"usage": data["usage"]}
        if "meta" in data:
            extra["meta"] = data["meta"]
        out.append(chunk(None, **extra))
    out.append(b"data: [DONE]\n\n")
    return out
