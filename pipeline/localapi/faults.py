"""Fault injection: every way a provider fails, at a chosen rate or on request.

The pipeline's retry, re-ask and resume paths are only trustworthy if they are exercised, so the
local API can fail like a provider does: 5xx answers, dropped connections, requests that hang (for
ever, or for ``hang_s`` seconds and then answer, as the long tail of a real API does), and answers
whose JSON is cut short, off-schema or wrapped in a Markdown fence. A test can also ask for one
outcome per row with a marker in the user message (``[[status:503]]``, ``[[refuse]]``).

Rate-driven faults are drawn from a seeded ``random.Random`` in arrival order, so a run with the same
seed and order sees the same faults. Broken JSON is decided by (body hash, attempt number) instead,
so the n-th attempt at one request is broken or clean whatever else the server is doing, and a retry
can come back clean.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from pipeline.localapi.documents import off_schema

if TYPE_CHECKING:
    from pipeline.localapi.handler import ServerConfig

#: ``[[status:503]]`` in the last user message: answer with that HTTP status (400-599).
STATUS_MARKER = re.compile(r"\[\[status:(\d{3})\]\]")
#: ``[[refuse]]`` in the last user message: answer with a refusal.
REFUSE_MARKER = "[[refuse]]"


def marker_status(last_user: str) -> int | None:
    """The HTTP status a ``[[status:NNN]]`` marker asks for, if any (only 400-599 count)."""
    if "[[" not in last_user:
        return None
    match = STATUS_MARKER.search(last_user)
    if match and 400 <= int(match.group(1)) <= 599:
        return int(match.group(1))
    return None


def wants_refusal(last_user: str) -> bool:
    return REFUSE_MARKER in last_user


class Fault(enum.Enum):
    NONE = "none"
    DROP = "drop"
    HANG = "hang"
    SERVER_ERROR = "server_error"


@dataclass(frozen=True, slots=True)
class Roll:
    """One request's drawn fault; ``status`` is the 5xx to answer for ``SERVER_ERROR``."""

    fault: Fault
    status: int = 0


class Faults:
    """The random state of fault injection; a new one per ``reset`` so a seed replays the same faults."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.attempts: dict[bytes, int] = {}

    def roll(self, drop_rate: float, hang_rate: float, fail_5xx_rate: float) -> Roll:
        """Draw one request's fault: the rates are consecutive slices of one uniform draw."""
        fault = self.rng.random()
        if fault < drop_rate:
            return Roll(Fault.DROP)
        fault -= drop_rate
        if fault < hang_rate:
            return Roll(Fault.HANG)
        fault -= hang_rate
        if fault < fail_5xx_rate:
            return Roll(Fault.SERVER_ERROR, (500, 502, 503)[int(fault / fail_5xx_rate * 3) % 3])
        return Roll(Fault.NONE)

    def corrupt(self, text: str, schema: dict[str, Any] | None, body_hash: bytes, rate: float) -> str | None:
        """The broken form of the n-th answer to this body, or None to leave it intact.

        Decided by (body, n): the same attempt is always broken the same way, and a retry can come
        back clean. One of three modes: cut in half (invalid JSON), off-schema, or fenced with chatter.
        """
        attempt = self.attempts.get(body_hash, 0)
        self.attempts[body_hash] = attempt + 1
        roll = hashlib.sha256(body_hash + attempt.to_bytes(4, "big")).digest()
        if int.from_bytes(roll[:8], "big") / 2**64 >= rate:
            return None
        mode = roll[8] % 3
        if mode == 0:
            return text[: max(len(text) // 2, 1)]
        if mode == 1:
            return orjson.dumps(off_schema(orjson.loads(text), schema)).decode()
        return f"```json\n{text}\n```\nLet me know if you need anything else!"


class Hangs:
    """Requests held open on purpose; ``cancel_all`` releases them so a hung request never blocks shutdown."""

    def __init__(self) -> None:
        self._waiting: set[asyncio.Future[None]] = set()

    async def hang(self, seconds: float | None = None) -> None:
        """Wait ``seconds`` (None: until cancelled); a client giving up cancels the handler and so this."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.add(fut)
        try:
            if seconds is None:
                await fut
            else:
                await asyncio.wait({fut}, timeout=max(seconds, 0.0))
                if fut.cancelled():
                    raise asyncio.CancelledError
        finally:
            self._waiting.discard(fut)

    def cancel_all(self) -> None:
        for fut in list(self._waiting):
            fut.cancel()

    def __len__(self) -> int:
        return len(self._waiting)


#: A gateway's sign-in page: what a proxy in front of the API answers when its session has expired.
LOGIN_PAGE = (
    b"<!DOCTYPE html><html><head><title>Sign in</title></head><body><form action='/login' method='post'>"
    b"<input name='user'><input name='password' type='password'><button>Sign in</button></form></body></html>"
)


class Systematic:
    """Failure of every request (``ServerConfig.fail_status``), for ``fail_for_s`` seconds or for ever.

    The clock starts at the first failing answer, so an outage of T seconds lasts T seconds of the run.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.since: float | None = None

    def failing(self, cfg: ServerConfig) -> tuple[int, bytes, str] | None:
        """(status, body, content type) of the failing answer, or None when the server answers normally."""
        if cfg.fail_status is None:
            return None
        now = self.clock()
        if self.since is None:
            self.since = now
        if cfg.fail_for_s is not None and now - self.since >= cfg.fail_for_s:
            return None
        status, kind = cfg.fail_status, cfg.fail_body
        if kind == "html":
            return status, LOGIN_PAGE, "text/html; charset=utf-8"
        if kind == "no_choices":
            body = {"id": "chatcmpl-local-none", "object": "chat.completion", "created": 0, "model": cfg.model_name}
            return status, orjson.dumps(body), "application/json"
        message = "The local API is failing every request (fail_status)." if kind == "json" else kind
        error = {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error"}
        return status, orjson.dumps({"error": {**error, "param": None, "code": None}}), "application/json"
