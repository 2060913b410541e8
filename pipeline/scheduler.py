"""Concurrency, request and token pacing, retries. Knows nothing of rows, files or the ledger.

Pacing is a leaky bucket (aiolimiter) holding one second of quota, so a run starts smoothly instead
of spending a minute's quota in its first second, and a 429 lowers the rate (multiplicatively, then
recovering slowly) instead of pausing every worker.

With a ``pipeline.pacing.Pacing`` (``Pacer(control=...)``, ``run_all(limit=...)``, ``call_paced``) the
loop is closed: the buckets follow the rates it learns from the server, a 429's Retry-After holds new
sends, the in-flight cap follows latency, and 429s are waited out instead of counted as tries.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from pipeline.errors import RetryableError
from pipeline.pacing import Pacing, ServerLimits, retry_delay

T = TypeVar("T")
R = TypeVar("R")

#: Seconds of quota a bucket holds: the largest burst the pacer allows.
BUCKET_SECONDS = 1.0
#: Token buckets hold one second too: providers (and the local API) enforce TPM over 1-second windows, and
#: a 6 s bucket let a run burst 6 s of tokens after any pause (607 429s in the TPM benchmark). A request
#: needing more than a second of TPM still passes: it takes the whole bucket (see ``Pacer.acquire``).
TOKEN_BUCKET_SECONDS = 1.0


class AdjustableLimiter(AsyncLimiter):
    """An ``AsyncLimiter`` whose rate can change without emptying or refilling the bucket."""

    def set_rate(self, per_second: float) -> None:
        self._leak()
        self._rate_per_sec = per_second

    def set_limit(self, per_second: float) -> None:
        """A new rate with a bucket of ``time_period`` seconds of it (one request at least).

        The level is clamped to the new bucket: a burst taken at a higher rate (a job limit 4× the
        server's) must not be paid back at the lower one, which stalled every send for ~4 s.
        """
        self.set_rate(per_second)
        self.max_rate = max(1.0, per_second * self.time_period)
        self._level = min(self._level, self.max_rate)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 6
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    jitter_s: float = 1.0
    #: ``call_paced`` only: total seconds one request may spend waiting out 429s (they are not tries).
    rate_limit_wait_s: float = 600.0


#: One generator for jitter: seeding a new ``random.Random()`` per request showed up in profiles.
_JITTER = random.Random()


def _delay(policy: RetryPolicy, rnd: random.Random, exc: BaseException | None, attempt: int) -> float:
    if isinstance(exc, RetryableError) and exc.retry_after is not None:
        return float(exc.retry_after) + rnd.uniform(0, min(policy.jitter_s, 0.25 + exc.retry_after * 0.1))
    exp: float = policy.backoff_initial_s * 2.0 ** max(attempt - 1, 0)
    return min(policy.backoff_max_s, exp) + rnd.uniform(0, policy.jitter_s)


def backoff_wait(
    policy: RetryPolicy, rng: random.Random | None = None, offset: int = 0
) -> Callable[[RetryCallState], float]:
    """Tenacity wait: the server's ``Retry-After`` when given, else exponential backoff with jitter."""
    rnd = rng or _JITTER

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        return _delay(policy, rnd, exc, state.attempt_number + offset)

    return wait


async def call_with_retries(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    on_retry: Callable[[BaseException, float], None] | None = None,
    rng: random.Random | None = None,
) -> T:
    """Run ``fn`` until it succeeds, raises a non-retryable error, or tries run out (last error raised).

    The first try runs outside tenacity: almost every request succeeds at once, and building a
    retrying object per request cost ~10% of the client's CPU at 2,000 requests/s.
    """
    try:
        return await fn()
    except RetryableError as exc:
        if policy.max_attempts <= 1:
            raise
        first_wait = _delay(policy, rng or _JITTER, exc, 1)
        if on_retry is not None:
            on_retry(exc, first_wait)
    await sleep(first_wait)

    def before_sleep(state: RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None and state.next_action is not None:
            exc = state.outcome.exception()
            assert exc is not None
            on_retry(exc, state.next_action.sleep)

    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.max_attempts - 1),
        wait=backoff_wait(policy, rng, offset=1),
        retry=retry_if_exception_type(RetryableError),
        sleep=sleep,
        reraise=True,
        before_sleep=before_sleep,
    )
    return await retrying(fn)


async def call_paced(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    pacing: Pacing | None = None,
    *,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    on_retry: Callable[[BaseException, float], None] | None = None,
    rng: random.Random | None = None,
) -> T:
    """Run ``fn`` until it succeeds, raises a non-retryable error, or its budget of waiting runs out.

    A 429 is a pacing signal, not a failed try: the next try waits for the pause the caller set with
    ``pacing.on_rate_limited`` (shared by every request) or else the Retry-After, as long as the 429
    waits of this request add up to at most ``policy.rate_limit_wait_s``. Other retryable errors count
    towards ``policy.max_attempts``; a lone one is retried at once (0.05-0.25 s), backoff grows only
    while they persist (``pacing.retry_delay``). The last error is raised when either budget is spent.
    """
    rnd = rng or _JITTER
    failures = 0
    throttled = 0
    waited = 0.0
    while True:
        try:
            return await fn()
        except RetryableError as exc:
            if exc.status_code == 429:
                throttled += 1
                wait = pacing.pause_s() if pacing is not None else 0.0
                if wait <= 0.0:  # no shared pause (none given, or the 429 was not reported): this one's own
                    exp = policy.backoff_initial_s * 2.0 ** (throttled - 1)
                    wait = exc.retry_after if exc.retry_after is not None else min(policy.backoff_max_s, exp)
                wait += rnd.uniform(0, min(policy.jitter_s, 0.05 + wait * 0.1))
                if waited + wait > policy.rate_limit_wait_s:
                    raise
                waited += wait
            else:
                failures += 1
                if failures >= policy.max_attempts:
                    raise
                if pacing is not None:
                    wait = pacing.retry_delay(
                        failures,
                        exc.retry_after,
                        initial_s=policy.backoff_initial_s,
                        max_s=policy.backoff_max_s,
                        jitter_s=policy.jitter_s,
                        rng=rnd,
                    )
                else:
                    wait = retry_delay(
                        failures,
                        retry_after=exc.retry_after,
                        initial_s=policy.backoff_initial_s,
                        max_s=policy.backoff_max_s,
                        jitter_s=policy.jitter_s,
                        rng=rnd,
                    )
            if on_retry is not None:
                on_retry(exc, wait)
        await sleep(wait)


class Quota(Protocol):
    """RPM/TPM held outside this event loop: shared by processes (a SQLite file) or a cluster (a Ray actor).

    ``pipeline.shared_limits.SqliteQuota`` and ``pipeline.executors.ray.RayQuota`` implement it.
    """

    async def take(self, tokens: float) -> None:
        """Wait until one request counting ``tokens`` tokens may be sent."""

    def set_factor(self, factor: float) -> None:
        """Pace at ``factor`` × the configured limits (lowered after 429s, recovered slowly)."""


class Pacer:
    """Request and token pacing shared by all workers of one run (one event loop).

    With a ``quota`` the limits are held there instead of in this process's own buckets, so several
    processes on one key keep its RPM/TPM together; 429 handling (the factor) stays the same.
    """

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        decrease: float = 0.8,
        recover_after_s: float = 10.0,
        quota: Quota | None = None,
        control: Pacing | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.clock = clock
        self.control = control
        self.sleep = sleep
        self.decrease = decrease
        self.recover_after_s = recover_after_s
        self.factor = 1.0
        self.quota = quota
        local = quota is None
        self.requests = AdjustableLimiter(rpm / 60 * BUCKET_SECONDS, BUCKET_SECONDS) if rpm and local else None
        self.tokens = (
            AdjustableLimiter(tpm / 60 * TOKEN_BUCKET_SECONDS, TOKEN_BUCKET_SECONDS) if tpm and local else None
        )
        self._primed = False
        self._followed: tuple[float | None, float | None] = (None, None)
        self._last_decrease = -1e9
        self._last_recover = clock()
        self._recent: collections.deque[float] = collections.deque(maxlen=4096)
        # Correction of the prompt-token estimate from what the server reports (ratio, EMA).
        self.prompt_ratio = 1.0
        self.completion_ratio = 1.0

    def estimate(self, est_prompt_tokens: int, max_tokens: int) -> int:
        """Tokens a request will count against TPM: corrected prompt estimate + expected completion."""
        completion = max_tokens * min(self.completion_ratio, 1.0)
        return max(1, int(est_prompt_tokens * self.prompt_ratio + completion))

    def _prime(self) -> None:
        """Start with one second of token quota, like the request bucket.

        An empty 6 s token bucket let a run open with a 6 s burst: ~165 long requests refused by a
        server enforcing its limit over 2 s windows. Done on first use, inside the event loop.
        """
        self._primed = True
        if self.tokens is not None and self.tpm:
            self.tokens._level = max(0.0, self.tokens.max_rate - self.tpm / 60 * BUCKET_SECONDS)
            self.tokens._last_check = asyncio.get_running_loop().time()

    async def acquire(self, tokens: int) -> None:
        if not self._primed:
            self._prime()
        if self.control is not None:
            # New sends wait out a 429's pause, then take from buckets set to the learned rates.
            while (pause := self.control.pause_s()) > 0:
                await self.sleep(pause)
            self._follow(self.control)
        if self.quota is not None:
            await self.quota.take(float(tokens) if self.tpm else 0.0)
        if self.requests is not None:
            await self.requests.acquire(1)
        if self.tokens is not None:
            await self.tokens.acquire(min(float(tokens), self.tokens.max_rate))
        self._recent.append(self.clock())
        if self.control is not None:
            self.control.on_send()

    def _follow(self, control: Pacing) -> None:
        """Set the buckets to ``control``'s rates (made on first need: a limit learned from headers)."""
        if self.quota is not None:
            self.quota.set_factor(control.rates.factor)
            return
        rpm, tpm = control.rpm(), control.tpm()
        if rpm and rpm != self._followed[0]:
            if self.requests is None:
                self.requests = AdjustableLimiter(max(1.0, rpm / 60 * BUCKET_SECONDS), BUCKET_SECONDS)
            self.requests.set_limit(rpm / 60)
        if tpm and tpm != self._followed[1]:
            if self.tokens is None:
                self.tokens = AdjustableLimiter(tpm / 60 * TOKEN_BUCKET_SECONDS, TOKEN_BUCKET_SECONDS)
                # Like ``_prime``: one second of tokens to start with, not the whole bucket.
                self.tokens._level = max(0.0, self.tokens.max_rate - tpm / 60 * BUCKET_SECONDS)
                self.tokens._last_check = asyncio.get_running_loop().time()
            self.tokens.set_limit(tpm / 60)
        self._followed = (rpm, tpm)

    def observe(
        self, est_prompt_tokens: int, max_tokens: int, prompt_tokens: int | None, completion_tokens: int | None
    ) -> None:
        """Fold one answer's reported usage into the estimates (EMA, so a drift is followed)."""
        if prompt_tokens and est_prompt_tokens > 0:
            self.prompt_ratio += 0.05 * (prompt_tokens / est_prompt_tokens - self.prompt_ratio)
        if completion_tokens is not None and max_tokens > 0:
            self.completion_ratio += 0.05 * (completion_tokens / max_tokens - self.completion_ratio)
        if self.control is not None:
            # Waiters set the buckets when they started waiting; an answer is the moment to apply what was
            # learned since (a recovered factor, the server's limit): 400 waiters otherwise kept a 429's
            # ×0.7 rate for the whole queue.
            self._follow(self.control)
        self._maybe_recover()

    def on_rate_limited(self, retry_after: float | None = None, ratelimit: ServerLimits | None = None) -> None:
        """A 429: lower the pace once per second at most; with no limit set, start one below what got through.

        With a ``control`` this is ``control.on_rate_limited(retry_after, ratelimit)``: call one of the two.
        """
        if self.control is not None:
            self.control.on_rate_limited(retry_after, ratelimit)
            return
        now = self.clock()
        if now - self._last_decrease < 1.0:
            return
        self._last_decrease = now
        self._last_recover = now
        if self.requests is None and self.rpm is None:
            # No limit was configured: start from the rate that was getting through, measured over the
            # last 10 s or the run's age if shorter (a young run must not read as a slow one).
            window = [t for t in self._recent if now - t <= 10.0]
            span = min(10.0, max(1.0, now - window[0])) if window else 10.0
            observed_rpm = max(len(window) / span * 60.0, 6.0)
            self.rpm = observed_rpm
            self.requests = AdjustableLimiter(observed_rpm / 60 * BUCKET_SECONDS, BUCKET_SECONDS)
        self.factor = max(0.1, self.factor * self.decrease)
        self._apply()

    def _maybe_recover(self) -> None:
        if self.factor >= 1.0:
            return
        now = self.clock()
        if now - self._last_recover >= self.recover_after_s:
            self._last_recover = now
            self.factor = min(1.0, self.factor + 0.05)
            self._apply()

    def _apply(self) -> None:
        if self.quota is not None:
            self.quota.set_factor(self.factor)
        if self.requests is not None and self.rpm:
            self.requests.set_rate(self.rpm / 60 * self.factor)
        if self.tokens is not None and self.tpm:
            self.tokens.set_rate(self.tpm / 60 * self.factor)


async def run_all(
    items: Iterable[T] | AsyncIterator[T],
    handle: Callable[[T], Awaitable[R]],
    on_result: Callable[[T, R], Awaitable[None] | None],
    *,
    concurrency: int,
    stop: asyncio.Event | None = None,
    limit: Callable[[], int] | None = None,
) -> None:
    """Feed ``items`` to ``concurrency`` workers; call ``on_result`` as each finishes.

    A fixed pool of workers (not one task per item) keeps memory flat for millions of items. When
    ``stop`` is set no new item starts; items already started run to completion. An exception from
    ``handle`` (a fatal error) cancels the others and is raised.

    With ``limit`` (e.g. ``Pacing.in_flight_limit``) the pool is a ceiling: at most ``limit()`` items
    are in ``handle`` at once, read again each time one starts or finishes.
    """
    # A short queue keeps the workers fed (rendering is far faster than answering) without holding
    # thousands of rendered bodies (images included) when the ceiling is in the thousands.
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=max(64, min(2 * concurrency, 512)))
    done = object()
    active = 0
    gate = asyncio.Condition()

    def room() -> bool:
        assert limit is not None
        return active < max(1, limit())

    async def gated(item: Any) -> Any:
        nonlocal active
        async with gate:
            await gate.wait_for(room)
            active += 1
        try:
            return await handle(item)
        finally:
            async with gate:
                active -= 1
                # Wake as many waiters as there is room now (the cap may have grown), not all of them.
                gate.notify(max(1, limit() - active) if limit is not None else 1)

    async def produce() -> None:
        # No try/finally here: if the group is cancelled, putting the end markers into a full queue
        # nobody reads any more would hang the shutdown forever.
        if isinstance(items, AsyncIterator):
            async for item in items:
                if stop is not None and stop.is_set():
                    break
                await queue.put(item)
        else:
            for item in items:
                if stop is not None and stop.is_set():
                    break
                await queue.put(item)
        for _ in range(concurrency):
            await queue.put(done)

    async def work() -> None:
        while True:
            item = await queue.get()
            if item is done:
                return
            if stop is not None and stop.is_set():
                continue
            result = await (handle(item) if limit is None else gated(item))
            maybe = on_result(item, result)
            if maybe is not None:
                await maybe

    async def pump() -> None:
        """The cap can grow with no request finishing (before a slow model's first answer, the cap grows
        with the age of the first request): let waiting workers in as it does, ten times a second."""
        assert limit is not None
        while True:
            await asyncio.sleep(0.1)
            async with gate:
                free = limit() - active
                if free > 0:
                    gate.notify(free)

    pumping = asyncio.create_task(pump()) if limit is not None else None
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(produce())
            for _ in range(concurrency):
                tg.create_task(work())
    except BaseExceptionGroup as group:
        # The first real error (a fatal answer, a bug) is what the caller acts on, not the group.
        first = next((e for e in group.exceptions if not isinstance(e, asyncio.CancelledError)), group.exceptions[0])
        raise first from None
    finally:
        if pumping is not None:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pumping
