"""Server-side rate limits for the local API, enforced the way providers enforce them.

Providers quote limits per minute but enforce them over short windows: a "600 RPM" key gets about
10 requests a second, not 600 in the first second and then silence. A pipeline that bursts a whole
minute's quota therefore sees 429s that a per-minute counter would never produce, and the pacer is
only tested honestly if the local API does the same. So each limit is a continuously refilled token
bucket holding ``burst_s`` seconds of quota (1 s by default), and every answer carries OpenAI's
headers (``x-ratelimit-limit-*``, ``-remaining-*``, ``-reset-*`` for ``requests`` and ``tokens``)
so a client can pace from them; a 429 adds ``Retry-After`` (whole seconds, at least 1) and
``retry-after-ms`` (the exact wait).

Time comes from an injectable ``clock`` (``time.monotonic`` by default): tests drive it by hand and
never sleep.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Clock = Callable[[], float]


class Bucket:
    """A continuously refilled token bucket; debt is allowed so one request larger than it can still pass.

    It starts full, holds at most ``burst_s`` seconds of the per-minute quota (never less than one
    unit, so a 10 RPM limit still admits a request) and refills at ``per_minute / 60`` a second.
    """

    __slots__ = ("capacity", "level", "limit", "per_s", "stamp")

    def __init__(self, per_minute: float, burst_s: float, now: float) -> None:
        if per_minute <= 0 or burst_s <= 0:
            raise ValueError(f"a rate limit needs per_minute > 0 and burst_s > 0, got {per_minute}, {burst_s}")
        self.limit = per_minute
        self.per_s = per_minute / 60.0
        self.capacity = max(self.per_s * burst_s, 1.0)
        self.level = self.capacity
        self.stamp = now

    def wait(self, cost: float, now: float) -> float:
        """Refill up to ``now``; seconds until ``cost`` fits (0.0: it fits now). Takes nothing."""
        self.level = min(self.capacity, self.level + max(now - self.stamp, 0.0) * self.per_s)
        self.stamp = max(now, self.stamp)
        need = min(cost, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.per_s

    def take(self, cost: float) -> None:
        self.level -= cost

    def headers(self, kind: str, out: dict[str, str]) -> None:
        """OpenAI's three headers for this bucket: the per-minute limit, what is left, when it is full."""
        out[f"x-ratelimit-limit-{kind}"] = str(int(self.limit))
        out[f"x-ratelimit-remaining-{kind}"] = str(max(int(self.level), 0))
        out[f"x-ratelimit-reset-{kind}"] = duration((self.capacity - self.level) / self.per_s)


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(int(seconds * 1000), 0)}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def request_tokens(prompt_tokens: int | None, max_tokens: int | None, completion_tokens: int, body_len: int) -> int:
    """What one request counts against TPM, as providers count it.

    With ``max_tokens`` the provider reserves prompt + ``max_tokens`` up front; without it the
    answer's real completion tokens count. A body that does not parse counts a quarter of its bytes
    (at least 1), so a flood of garbage is still limited.
    """
    if prompt_tokens is None:
        return max(body_len // 4, 1)
    if max_tokens is not None:
        return prompt_tokens + max_tokens
    return prompt_tokens + completion_tokens


@dataclass(slots=True)
class Verdict:
    """One request's fate: the headers to send and, when limited, how long to wait and which limit bit."""

    headers: dict[str, str] = field(default_factory=dict)
    wait_s: float = 0.0
    limit: str = ""  # "requests" | "tokens" when limited

    @property
    def admitted(self) -> bool:
        return self.wait_s == 0.0


class RateLimits:
    """The RPM and TPM buckets of one server; either may be absent (``None``: no limit)."""

    def __init__(
        self, rpm: float | None, tpm: float | None, burst_s: float = 1.0, clock: Clock = time.monotonic
    ) -> None:
        self.clock = clock
        now = clock()
        self.requests = Bucket(rpm, burst_s, now) if rpm is not None else None
        self.tokens = Bucket(tpm, burst_s, now) if tpm is not None else None

    def check(self, tokens: int) -> Verdict:
        """Admit one request costing ``tokens`` (taking from both buckets) or say how long to wait.

        A request is admitted only when both limits allow it, and then takes from both: a request
        refused for tokens does not spend a request slot. Limited answers carry ``Retry-After`` and
        ``retry-after-ms``; every answer carries the rate-limit headers, read after the take.
        """
        now = self.clock()
        wait_r = self.requests.wait(1, now) if self.requests is not None else 0.0
        wait_t = self.tokens.wait(tokens, now) if self.tokens is not None else 0.0
        verdict = Verdict()
        if wait_r == 0.0 and wait_t == 0.0:
            if self.requests is not None:
                self.requests.take(1)
            if self.tokens is not None:
                self.tokens.take(tokens)
        else:
            verdict.wait_s = max(wait_r, wait_t)
            verdict.limit = "requests" if wait_r >= wait_t else "tokens"
        if self.requests is not None:
            self.requests.headers("requests", verdict.headers)
        if self.tokens is not None:
            self.tokens.headers("tokens", verdict.headers)
        if not verdict.admitted:
            verdict.headers["Retry-After"] = str(max(1, math.ceil(verdict.wait_s)))
            verdict.headers["retry-after-ms"] = str(max(1, math.ceil(verdict.wait_s * 1000)))
        return verdict
