"""Answers as server-sent events: the request that asks for them, and the stream read back into one answer.

A stream is watched for silence, not for its length: a slow model still writing is never cut off, and
one that stops sending is retried. ``wait_until`` is that watch, shared with ``attempts``' deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import httpx
import orjson

from pipeline.errors import RetryableError

__all__ = ["Assembly", "is_sse", "next_piece", "read_events", "streaming_body", "wait_until"]

T = TypeVar("T")


def streaming_body(body: bytes) -> bytes:
    data = orjson.loads(body)
    data["stream"] = True
    data["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": True}
    return orjson.dumps(data)


def is_sse(response: httpx.Response) -> bool:
    return "text/event-stream" in response.headers.get("content-type", "")


async def wait_until(
    task: asyncio.Future[T],
    since: float,
    limit: Callable[[], float],
    expired: Callable[[float], BaseException],
) -> T:
    """``task``'s result, or ``expired(limit())`` raised once ``limit()`` seconds have passed since ``since``
    (``time.monotonic``). ``limit`` is read again twice a second, so a limit learned while waiting applies
    to what already waits; the task is cancelled when the wait gives up.

    One mechanism for a request watched by a deadline still being learned (``attempts``) and a stream's
    silence (``next_piece``).
    """
    try:
        while True:
            current = limit()
            remaining = since + current - time.monotonic()
            if remaining <= 0:
                raise expired(current)
            done, _ = await asyncio.wait({task}, timeout=min(remaining, 0.5))
            if done:
                return task.result()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        elif not task.cancelled():
            task.exception()  # retrieved: a failure that lands as the wait is cancelled is no stray traceback


async def next_piece(chunks: AsyncIterator[bytes], stall: Callable[[], float]) -> bytes | None:
    """The next piece of the stream, or a stall once it has been silent for ``stall()`` (read twice a second)."""

    def stalled(limit: float) -> RetryableError:
        return RetryableError(f"stream stalled: no chunk for {limit:g}s", kind="stall", sent=True)

    return await wait_until(asyncio.ensure_future(anext(chunks, None)), time.monotonic(), stall, stalled)


async def read_events(response: httpx.Response, stall: Callable[[], float]) -> dict[str, Any]:
    """Read an SSE chat-completion stream into one answer; a silence of ``stall()`` between chunks is a stall."""
    chunks = response.aiter_bytes()
    answer = Assembly()
    pending = b""
    while not answer.done:
        piece = await next_piece(chunks, stall)
        if piece is None:
            break
        pending += piece
        *lines, pending = pending.split(b"\n")
        for line in lines:
            answer.feed(line.strip())
    if pending.strip():
        answer.feed(pending.strip())
    return answer.result()


class Assembly:
    """Deltas of an SSE stream folded into ``{"id", "model", "choices": [{"message", "finish_reason"}], "usage"}``."""

    def __init__(self) -> None:
        self.top: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.done = False

    def feed(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return  # comments (": keep-alive"), event names, blank separators
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise RetryableError("stream chunk that is not JSON", kind="bad_response", status_code=200) from None
        if not isinstance(chunk, dict):
            return
        if "error" in chunk:
            err = chunk["error"]
            message = err.get("message") if isinstance(err, dict) else err
            raise RetryableError(f"error inside the stream: {message}"[:300], kind="stream_error", status_code=200)
        for key in ("id", "object", "created", "model", "system_fingerprint"):
            if key in chunk and key not in self.top:
                self.top[key] = chunk[key]
        for key in ("usage", "meta"):
            if chunk.get(key):
                self.top[key] = chunk[key]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            slot = self.choices.setdefault(int(choice.get("index") or 0), {"parts": {}, "finish_reason": None})
            delta = choice.get("delta") or {}
            for key in ("content", "reasoning_content", "refusal"):
                if isinstance(delta.get(key), str):
                    slot["parts"].setdefault(key, []).append(delta[key])
            for call in delta.get("tool_calls") or []:
                if isinstance(call, dict):
                    self._feed_tool_call(slot, call)
            if choice.get("finish_reason"):
                slot["finish_reason"] = choice["finish_reason"]

    @staticmethod
    def _feed_tool_call(slot: dict[str, Any], call: dict[str, Any]) -> None:
        """A tool call arrives as pieces keyed by ``index``: id and name once, ``arguments`` in fragments."""
        calls = slot.setdefault("tool_calls", {})
        entry = calls.setdefault(int(call.get("index") or 0), {"id": None, "type": "function", "name": "", "args": []})
        if call.get("id"):
            entry["id"] = call["id"]
        if call.get("type"):
            entry["type"] = call["type"]
        function = call.get("function") or {}
        if isinstance(function.get("name"), str):
            entry["name"] += function["name"]
        if isinstance(function.get("arguments"), str):
            entry["args"].append(function["arguments"])

    def result(self) -> dict[str, Any]:
        if not self.choices:
            raise RetryableError("stream ended without choices", kind="bad_response", status_code=200)
        if not self.done and not all(c["finish_reason"] for c in self.choices.values()):
            raise RetryableError("stream ended before the answer did", kind="connection", sent=True)
        choices = []
        for index in sorted(self.choices):
            slot = self.choices[index]
            message: dict[str, Any] = {"role": "assistant", "content": None}
            message.update({key: "".join(parts) for key, parts in slot["parts"].items()})
            if slot.get("tool_calls"):
                message["tool_calls"] = [
                    {
                        "id": call["id"],
                        "type": call["type"],
                        "function": {"name": call["name"], "arguments": "".join(call["args"])},
                    }
                    for _, call in sorted(slot["tool_calls"].items())
                ]
            choices.append({"index": index, "message": message, "finish_reason": slot["finish_reason"]})
        return {**self.top, "object": "chat.completion", "choices": choices}
