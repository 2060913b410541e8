"""Concurrency, request and token pacing, retries. Knows nothing of rows, files or the ledger.

Pacing is a leaky bucket (aiolimiter) holding one second of quota, so a run starts smoothly instead
of spending a minute's quota in its first second. The policy is ``pipeline.pacing.Pacing``'s
(``Pacer(control=...)``, ``run_all(limit=...)``, ``call_paced``): the buckets follow the rates it learns
from the server, a 429's Retry-After holds new sends, the in-flight cap follows latency, and 429s are
waited out instead of counted as tries. Retries run on tenacity with ``_RetryBudget`` as its stop and wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

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


class _RetryBudget:
    """One request's budget of retries; tenacity asks it whether to stop and how long to wait.

    A 429 is a pacing signal, not a failed try: the next try waits for the pause the caller set with
    ``pacing.on_rate_limited`` (shared by every request) or else the Retry-After, as long as the 429
    waits of this request add up to at most ``policy.rate_limit_wait_s``. Other retryable errors count
    towards ``policy.max_attempts``; a lone one is retried at once (0.05-0.25 s), backoff grows only
    while they persist (``pacing.retry_delay``).
    """

    def __init__(self, policy: RetryPolicy, pacing: Pacing | None, rng: random.Random) -> None:
        self.policy = policy
        self.pacing = pacing
        self.rng = rng
        self.failures = 0
        self.throttled = 0
        self.waited = 0.0
        self._decided: tuple[int, float | None] = (0, None)

    def after(self, exc: RetryableError) -> float | None:
        """Seconds to wait before the next try after ``exc``, or None when this request's budget is spent."""
        policy, rnd = self.policy, self.rng
        if exc.status_code == 429:
            self.throttled += 1
            wait = self.pacing.pause_s() if self.pacing is not None else 0.0
            if wait <= 0.0:  # no shared pause (none given, or the 429 was not reported): this one's own
                exp = policy.backoff_initial_s * 2.0 ** (self.throttled - 1)
                wait = exc.retry_after if exc.retry_after is not None else min(policy.backoff_max_s, exp)
            wait += rnd.uniform(0, min(policy.jitter_s, 0.05 + wait * 0.1))
            if self.waited + wait > policy.rate_limit_wait_s:
                return None
            self.waited += wait
            return wait
        if exc.during_outage:  # the circuit holds the next try until a probe succeeds: no attempt used up
            return 0.0
        self.failures += 1
        if self.failures >= policy.max_attempts:
            return None
        delay = self.pacing.retry_delay if self.pacing is not None else _retry_delay
        return delay(
            self.failures,
            exc.retry_after,
            initial_s=policy.backoff_initial_s,
            max_s=policy.backoff_max_s,
            jitter_s=policy.jitter_s,
            rng=rnd,
        )

    def _decide(self, state: RetryCallState) -> float | None:
        # tenacity asks ``wait`` and ``stop`` about the same failed try: decide once per try.
        if self._decided[0] != state.attempt_number:
            exc = state.outcome.exception() if state.outcome is not None else None
            assert isinstance(exc, RetryableError)  # ``retry`` lets nothing else through
            self._decided = (state.attempt_number, self.after(exc))
        return self._decided[1]

    def stop(self, state: RetryCallState) -> bool:
        return self._decide(state) is None

    def wait(self, state: RetryCallState) -> float:
        return self._decide(state) or 0.0


def _retry_delay(
    failures: int,
    retry_after: float | None,
    *,
    initial_s: float,
    max_s: float,
    jitter_s: float,
    rng: random.Random,
) -> float:
    return retry_delay(failures, retry_after=retry_after, initial_s=initial_s, max_s=max_s, jitter_s=jitter_s, rng=rng)


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

    The rules are ``_RetryBudget``'s; tenacity runs the loop. The first try runs outside tenacity:
    almost every request succeeds at once, and building a retrying object per request cost ~10% of the
    client's CPU at 2,000 requests/s. The last error is raised when the budget is spent.
    """
    try:
        return await fn()
    except RetryableError as exc:
        first = exc
    budget = _RetryBudget(policy, pacing, rng or _JITTER)
    wait = budget.after(first)
    if wait is None:
        raise first
    if on_retry is not None:
        on_retry(first, wait)
    await sleep(wait)

    def before_sleep(state: RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None and state.next_action is not None:
            exc = state.outcome.exception()
            assert exc is not None
            on_retry(exc, state.next_action.sleep)

    retrying = AsyncRetrying(
        stop=budget.stop,
        wait=budget.wait,
        retry=retry_if_exception_type(RetryableError),
        sleep=sleep,
        reraise=True,
        before_sleep=before_sleep,
    )
    return await retrying(fn)


class Quota(Protocol):
    """RPM/TPM held outside this event loop: shared by processes (a SQLite file) or a cluster (a Ray actor).

    ``pipeline.shared_limits.SqliteQuota`` and ``pipeline.executors.ray.RayQuota`` implement it.
    """

    async def take(self, tokens: float) -> None:
        """Wait until one request counting ``tokens`` tokens may be sent."""

    def set_factor(self, factor: float) -> None:
        """Pace at ``factor`` × the configured limits (lowered after 429s, recovered slowly)."""


class Pacer:
    """Request and token buckets shared by all workers of one run (one event loop), set by ``control``.

    ``control`` (``pipeline.pacing.Pacing``) decides the rates: the job's limits, lowered after 429s,
    or the server's learned from its headers; the buckets only space the sends. With a ``quota`` the
    limits are held there instead of in this process's own buckets, so several processes on one key
    keep its RPM/TPM together.
    """

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None,
        *,
        control: Pacing,
        quota: Quota | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.control = control
        self.sleep = sleep
        self.quota = quota
        local = quota is None
        self.requests = AdjustableLimiter(rpm / 60 * BUCKET_SECONDS, BUCKET_SECONDS) if rpm and local else None
        self.tokens = (
            AdjustableLimiter(tpm / 60 * TOKEN_BUCKET_SECONDS, TOKEN_BUCKET_SECONDS) if tpm and local else None
        )
        self._primed = False
        self._followed: tuple[float | None, float | None] = (None, None)
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
                # Learned mid-run (a server's headers): the last second's sends have used the server's
                # bucket already. A new bucket that started full let a second burst through on top of
                # them (S4, no RPM in the job: 26 429s in the first 0.15 s).
                self.requests._level = min(self.requests.max_rate, float(control.rates.sent_within(BUCKET_SECONDS)))
                self.requests._last_check = asyncio.get_running_loop().time()
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
        # Waiters set the buckets when they started waiting; an answer is the moment to apply what was
        # learned since (a recovered factor, the server's limit): 400 waiters otherwise kept a 429's
        # ×0.7 rate for the whole queue.
        self._follow(self.control)

    def on_rate_limited(self, retry_after: float | None = None, ratelimit: ServerLimits | None = None) -> None:
        """A 429: ``control`` lowers the rate and holds new sends for its Retry-After."""
        self.control.on_rate_limited(retry_after, ratelimit)


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
            grow()

    workers = 0
    finished = False  # every item is queued
    group: asyncio.TaskGroup | None = None

    def grow() -> None:
        """Start workers up to what the cap can use (all of ``concurrency`` without a cap).

        Starting 4,096 workers at once held the run's first request back by every worker's first step
        (~0.1 s); with a cap, a worker per request the cap admits (and a few spare) is enough, more as it grows.
        """
        nonlocal workers
        if group is None or (finished and queue.empty()):
            return
        want = concurrency if limit is None else min(concurrency, max(1, limit()) + 16)
        while workers < want:
            workers += 1
            group.create_task(work())

    async def produce() -> None:
        # No try/finally here: if the group is cancelled, putting the end marker into a full queue
        # nobody reads any more would hang the shutdown forever.
        nonlocal finished
        first = True
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
                if first:  # a worker sends it before the items behind it are made (a chunk: ~20 ms)
                    first = False
                    await asyncio.sleep(0)
        finished = True
        await queue.put(done)

    async def work() -> None:
        while True:
            item = await queue.get()
            if item is done:
                queue.put_nowait(done)  # one marker ends every worker, however many started
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
            grow()
            async with gate:
                free = limit() - active
                if free > 0:
                    gate.notify(free)

    pumping = asyncio.create_task(pump()) if limit is not None else None
    try:
        async with asyncio.TaskGroup() as tg:
            group = tg
            tg.create_task(produce())
            grow()
    except BaseExceptionGroup as group_error:
        # The first real error (a fatal answer, a bug) is what the caller acts on, not the group.
        errors = group_error.exceptions
        first = next((e for e in errors if not isinstance(e, asyncio.CancelledError)), errors[0])
        raise first from None
    finally:
        if pumping is not None:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pumping
