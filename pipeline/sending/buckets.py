"""Request and token buckets: the sends of one run spaced at the rates ``pacing.Pacing`` decides.

A bucket holds one second of quota, so a run starts smoothly instead of spending a minute's quota in its
first second, and providers (and the local API) enforce their per-minute limits over 1-second windows.
``LeakyBucket`` is this module's own: pacing needs to set a bucket's rate and level mid-run (a limit
learned from headers starts with the sends the server has already counted), which aiolimiter's public
API cannot do. Clock and sleep are parameters, so the tests drive time by hand.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from pipeline.sending.pacing import Pacing, ServerLimits

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[Any]]

#: Seconds of quota a bucket holds: the largest burst the pacer allows.
BUCKET_SECONDS = 1.0
#: Token buckets hold one second too: a longer bucket lets a run burst that many seconds of tokens after
#: any pause, which a server enforcing TPM over 1-second windows refuses. A request needing more than a
#: second of TPM still passes: it takes the whole bucket (see ``LeakyBucket.acquire``).
TOKEN_BUCKET_SECONDS = 1.0


class LeakyBucket:
    """``capacity`` units that drain at ``rate`` per second; ``acquire(n)`` waits until ``n`` more fit.

    Waiters take turns in arrival order (an ``asyncio.Lock`` is FIFO): only the first one sleeps, for
    exactly the time its amount needs to drain, so thousands of waiting requests cost one timer.
    """

    def __init__(
        self,
        per_second: float,
        seconds: float = BUCKET_SECONDS,
        *,
        level: float = 0.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.seconds = seconds
        self.rate = per_second
        self.capacity = max(1.0, per_second * seconds)
        self.clock = clock
        self.sleep = sleep
        self._level = min(max(0.0, level), self.capacity)
        self._updated = clock()
        self._turn = asyncio.Lock()

    def level(self) -> float:
        """Units in the bucket now (what was taken and has not drained yet)."""
        self._drain()
        return self._level

    def set_level(self, level: float) -> None:
        """Count ``level`` units as taken already (clamped to the bucket)."""
        self._drain()
        self._level = min(max(0.0, level), self.capacity)

    def set_rate(self, per_second: float) -> None:
        """A new rate with a bucket of ``seconds`` of it. What was taken so far drains at the new rate,
        clamped to the new bucket: a burst taken at a higher rate is not paid back at the lower one."""
        self._drain()
        self.rate = per_second
        self.capacity = max(1.0, per_second * self.seconds)
        self._level = min(self._level, self.capacity)

    def _drain(self) -> None:
        now = self.clock()
        if self.rate > 0:
            self._level = max(0.0, self._level - (now - self._updated) * self.rate)
        self._updated = now

    def _take(self, amount: float) -> float:
        """Take ``amount`` if it fits (returns 0), else the seconds until it will."""
        self._drain()
        over = self._level + amount - self.capacity
        if over <= 1e-9:
            self._level += amount
            return 0.0
        return over / self.rate if self.rate > 0 else 1.0

    async def acquire(self, amount: float = 1.0) -> None:
        """Wait until ``amount`` fits. An amount larger than the bucket takes the whole bucket, capped again
        at every turn: a rate lowered while it waits (a 429) shrinks the bucket under it."""
        if not self._turn.locked() and self._take(min(amount, self.capacity)) == 0.0:
            return
        async with self._turn:
            while (wait := self._take(min(amount, self.capacity))) > 0.0:
                await self.sleep(wait)


class Quota(Protocol):
    """RPM/TPM held outside this event loop: shared by processes (a SQLite file) or a cluster (a Ray actor).

    ``pipeline.sending.shared_limits.SqliteQuota`` and ``pipeline.executors.ray_limits.RayQuota`` implement it.
    """

    async def take(self, tokens: float) -> None:
        """Wait until one request counting ``tokens`` tokens may be sent."""

    def set_factor(self, factor: float) -> None:
        """Pace at ``factor`` × the configured limits (lowered after 429s, recovered slowly)."""


class Pacer:
    """Request and token buckets shared by all workers of one run (one event loop), set by ``control``.

    ``control`` decides the rates (the job's limits, lowered after 429s, or the server's learned from its
    headers); the buckets only space the sends. With a ``quota`` the limits are held there instead of in
    this process's own buckets, so several processes on one key keep its RPM/TPM together.
    """

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None,
        *,
        control: Pacing,
        quota: Quota | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.control = control
        self.clock = clock
        self.sleep = sleep
        self.quota = quota
        self.requests: LeakyBucket | None = None
        self.tokens: LeakyBucket | None = None
        if quota is None and rpm:
            self.requests = self._bucket(rpm / 60, BUCKET_SECONDS)
        if quota is None and tpm:
            self.tokens = self._token_bucket(tpm)
        self._primed = False
        self._followed: tuple[float | None, float | None] = (None, None)
        # Correction of the prompt-token estimate from what the server reports (ratio, EMA).
        self.prompt_ratio = 1.0
        self.completion_ratio = 1.0

    def _bucket(self, per_second: float, seconds: float, level: float = 0.0) -> LeakyBucket:
        return LeakyBucket(per_second, seconds, level=level, clock=self.clock, sleep=self.sleep)

    def _token_bucket(self, tpm: float) -> LeakyBucket:
        """Start with one second of token quota, like the request bucket: a full bucket of several
        seconds would open the run with a burst the server refuses."""
        bucket = self._bucket(tpm / 60, TOKEN_BUCKET_SECONDS)
        bucket.set_level(bucket.capacity - tpm / 60 * BUCKET_SECONDS)
        return bucket

    def estimate(self, est_prompt_tokens: int, max_tokens: int) -> int:
        """Tokens a request will count against TPM: corrected prompt estimate + expected completion."""
        completion = max_tokens * min(self.completion_ratio, 1.0)
        return max(1, int(est_prompt_tokens * self.prompt_ratio + completion))

    async def acquire(self, tokens: int) -> None:
        if not self._primed:  # the first send, not the construction, is when the token bucket starts
            self._primed = True
            if self.tokens is not None and self.tpm:
                self.tokens.set_level(self.tokens.capacity - self.tpm / 60 * BUCKET_SECONDS)
        # New sends wait out a 429's pause, then take from buckets set to the learned rates.
        while (pause := self.control.pause_s()) > 0:
            await self.sleep(pause)
        self._follow(self.control)
        if self.quota is not None:
            await self.quota.take(float(tokens) if self.tpm else 0.0)
        if self.requests is not None:
            await self.requests.acquire(1)
        if self.tokens is not None:
            await self.tokens.acquire(float(tokens))
        self.control.on_send()

    def _follow(self, control: Pacing) -> None:
        """Set the buckets to ``control``'s rates (made on first need: a limit learned from headers)."""
        if self.quota is not None:
            self.quota.set_factor(control.rates.factor)
            return
        rpm, tpm = control.rpm(), control.tpm()
        if rpm and rpm != self._followed[0]:
            if self.requests is None:
                # Learned mid-run (a server's headers): the last second's sends have used the server's
                # bucket already, so they count as taken; a full new bucket would let a second burst through.
                sent = float(control.rates.sent_within(BUCKET_SECONDS))
                self.requests = self._bucket(max(1.0, rpm / 60), BUCKET_SECONDS, level=sent)
            self.requests.set_rate(rpm / 60)
        if tpm and tpm != self._followed[1]:
            if self.tokens is None:
                self.tokens = self._token_bucket(tpm)
            self.tokens.set_rate(tpm / 60)
        self._followed = (rpm, tpm)

    def observe(
        self, est_prompt_tokens: int, max_tokens: int, prompt_tokens: int | None, completion_tokens: int | None
    ) -> None:
        """Fold one answer's reported usage into the estimates (EMA, so a drift is followed)."""
        if prompt_tokens and est_prompt_tokens > 0:
            self.prompt_ratio += 0.05 * (prompt_tokens / est_prompt_tokens - self.prompt_ratio)
        if completion_tokens is not None and max_tokens > 0:
            self.completion_ratio += 0.05 * (completion_tokens / max_tokens - self.completion_ratio)
        # Waiters set the buckets when they started waiting; an answer is the moment to apply what was
        # learned since (a recovered factor, the server's limit), or the whole queue keeps a 429's rate.
        self._follow(self.control)

    def on_rate_limited(self, retry_after: float | None = None, ratelimit: ServerLimits | None = None) -> None:
        """A 429: ``control`` lowers the rate and holds new sends for its Retry-After."""
        self.control.on_rate_limited(retry_after, ratelimit)
