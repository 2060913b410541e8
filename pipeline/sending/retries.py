"""How long to wait before a request's next try, and when to stop: one rule, as tenacity stop/wait callables.

``retry_delay`` is the only wait formula. A ``Retry-After`` is honoured (plus a little jitter, so the
rows it held do not all return in the same millisecond); without one the wait is a quick retry while
failures are rare across the run and jittered exponential backoff while they persist. A 429 is a pacing
signal, not a failed try: its waits are the same rule fed with the shared pause (or its own
Retry-After), counted against ``rate_limit_wait_s`` instead of ``max_attempts``.

``RetryBudget.stop`` and ``RetryBudget.wait`` are what tenacity's ``AsyncRetrying`` asks; ``call_paced``
runs the loop with an injected ``sleep``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from pipeline.errors import RetryableError

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The job's ``[limits]`` for retrying one request."""

    max_attempts: int = 6
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    jitter_s: float = 1.0
    #: Total seconds one request may spend waiting out 429s (they are not tries).
    rate_limit_wait_s: float = 600.0


class RunSignals(Protocol):
    """What the run knows beyond one request (``pacing.Pacing`` is one)."""

    def pause_s(self) -> float:
        """Seconds every new send is held for (a 429's Retry-After, shared by all requests)."""

    def failures_persist(self) -> bool:
        """Whether failures are common across recent requests (the server is failing, not this request)."""


#: One generator for jitter: seeding a new ``random.Random()`` per request costs CPU a fast run needs.
_JITTER = random.Random()


def retry_delay(
    failures: int,
    *,
    retry_after: float | None = None,
    persistent: bool | None = None,
    quick_s: tuple[float, float] = (0.05, 0.25),
    initial_s: float = 1.0,
    max_s: float = 60.0,
    jitter_s: float = 1.0,
    rng: random.Random | None = None,
) -> float:
    """Wait before try ``failures + 1`` (``failures`` ≥ 1 tries of this kind failed so far).

    ``persistent`` is what the run knows of other requests: True when failures are common across them
    (exponential backoff from ``initial_s`` at once), False when they are rare (this request was unlucky
    again: retried after ``quick_s``, a step later each time, since a long backoff for one of the last rows
    holds the whole run), None when nothing is known (a lone failure quick, exponential from the second).
    """
    rnd = rng or _JITTER
    if retry_after is not None:
        return retry_after + rnd.uniform(0, min(jitter_s, 0.05 + retry_after * 0.1))
    if persistent is False:
        return min(max_s, rnd.uniform(*quick_s) * failures)
    if persistent is None and failures <= 1:
        return rnd.uniform(*quick_s)
    exponent = max(failures - (1 if persistent else 2), 0)
    return min(max_s, initial_s * 2.0**exponent) + rnd.uniform(0, jitter_s)


class RetryBudget:
    """One request's budget of retries; tenacity asks ``stop`` and ``wait`` about each failed try.

    A 429 waits for the run's shared pause (``signals.pause_s``) or else its own Retry-After, else
    backoff; those waits add up to at most ``policy.rate_limit_wait_s``. A failure while the circuit is
    open (``during_outage``) is retried at once: the circuit holds the try, no attempt is used up. Other
    retryable errors count towards ``policy.max_attempts``.
    """

    def __init__(self, policy: RetryPolicy, signals: RunSignals | None, rng: random.Random) -> None:
        self.policy = policy
        self.signals = signals
        self.rng = rng
        self.failures = 0
        self.throttled = 0
        self.waited = 0.0
        self._decided: tuple[int, float | None] = (0, None)

    def after(self, exc: RetryableError) -> float | None:
        """Seconds to wait before the next try after ``exc``, or None when this request's budget is spent."""
        if exc.status_code == 429:
            return self._after_rate_limit(exc)
        if exc.during_outage:
            return 0.0
        self.failures += 1
        if self.failures >= self.policy.max_attempts:
            return None
        persistent = self.signals.failures_persist() if self.signals is not None else None
        return self._delay(self.failures, exc.retry_after, persistent)

    def _after_rate_limit(self, exc: RetryableError) -> float | None:
        self.throttled += 1
        shared = self.signals.pause_s() if self.signals is not None else 0.0
        retry_after = shared if shared > 0.0 else exc.retry_after
        wait = self._delay(self.throttled, retry_after, True)
        if self.waited + wait > self.policy.rate_limit_wait_s:
            return None
        self.waited += wait
        return wait

    def _delay(self, failures: int, retry_after: float | None, persistent: bool | None) -> float:
        p = self.policy
        return retry_delay(
            failures,
            retry_after=retry_after,
            persistent=persistent,
            initial_s=p.backoff_initial_s,
            max_s=p.backoff_max_s,
            jitter_s=p.jitter_s,
            rng=self.rng,
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


async def call_paced(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    signals: RunSignals | None = None,
    *,
    sleep: Sleep = asyncio.sleep,
    on_retry: Callable[[BaseException, float], None] | None = None,
    rng: random.Random | None = None,
) -> T:
    """Run ``fn`` until it succeeds, raises a non-retryable error, or its budget runs out (the last error).

    The first try runs outside tenacity: almost every request succeeds at once, and building a retrying
    object per request is CPU a fast run needs.
    """
    try:
        return await fn()
    except RetryableError as exc:
        first = exc
    budget = RetryBudget(policy, signals, rng or _JITTER)
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
