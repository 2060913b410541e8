"""The one retry-wait rule: exact waits with an injected sleep, 429s paced but never counted as tries."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from pipeline.errors import RetryableError, RowError
from pipeline.sending.buckets import Pacer
from pipeline.sending.pacing import Pacing
from pipeline.sending.retries import RetryPolicy, call_paced, retry_delay
from tests.fake_time import FakeTime


def test_retry_waits_honour_retry_after_then_back_off() -> None:
    waits: list[float] = []
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RetryableError("503 with Retry-After", status_code=503, retry_after=5.0)
        if calls < 5:
            raise RetryableError("503", status_code=503)
        return "ok"

    async def sleep(s: float) -> None:
        waits.append(s)

    policy = RetryPolicy(max_attempts=6, backoff_initial_s=1.0, backoff_max_s=60, jitter_s=0.0)
    result = asyncio.run(call_paced(flaky, policy, sleep=sleep, rng=random.Random(1)))
    assert result == "ok"
    assert calls == 5
    assert 5.0 <= waits[0] <= 5.75  # Retry-After plus a little jitter
    assert waits[1:] == [1.0, 2.0, 4.0]  # then exponential while the failures persist


def test_a_lone_failure_is_retried_at_once() -> None:
    waits: list[float] = []
    calls = 0

    async def once() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RetryableError("dropped", kind="connection")
        return "ok"

    async def sleep(s: float) -> None:
        waits.append(s)

    assert asyncio.run(call_paced(once, RetryPolicy(), sleep=sleep, rng=random.Random(2))) == "ok"
    assert len(waits) == 1 and 0.05 <= waits[0] <= 0.25


def test_retries_stop_and_reraise_last_error() -> None:
    waits: list[float] = []
    calls = 0

    async def always() -> None:
        nonlocal calls
        calls += 1
        raise RetryableError(f"500 #{calls}", status_code=500)

    async def sleep(s: float) -> None:
        waits.append(s)

    policy = RetryPolicy(max_attempts=4, backoff_initial_s=1, backoff_max_s=1.5, jitter_s=0)
    with pytest.raises(RetryableError, match="500 #4"):
        asyncio.run(call_paced(always, policy, sleep=sleep, rng=random.Random(3)))
    assert calls == 4
    assert 0.05 <= waits[0] <= 0.25
    assert waits[1:] == [1.0, 1.5]  # capped by backoff_max_s


def test_row_error_is_not_retried() -> None:
    calls = 0

    async def bad() -> None:
        nonlocal calls
        calls += 1
        raise RowError("400")

    with pytest.raises(RowError):
        asyncio.run(call_paced(bad, RetryPolicy(max_attempts=5)))
    assert calls == 1


def test_retry_after_pauses_new_sends_and_does_not_count_against_max_attempts() -> None:
    t = FakeTime()
    pacing = Pacing(600, None, clock=t)
    pacer = Pacer(600, None, control=pacing, clock=t, sleep=t.sleep)
    sends: list[float] = []
    calls = 0

    async def attempt() -> str:
        nonlocal calls
        await pacer.acquire(1)
        sends.append(t.now)
        calls += 1
        if calls <= 8:  # eight 429s in a row: more than max_attempts, still not a failure
            pacing.on_rate_limited(2.0)
            raise RetryableError("429", status_code=429, retry_after=2.0)
        return "ok"

    policy = RetryPolicy(max_attempts=2, jitter_s=0.0, rate_limit_wait_s=600)

    async def go() -> None:
        assert await call_paced(attempt, policy, pacing, sleep=t.sleep, rng=random.Random(0)) == "ok"
        # Another request's send is held by the shared pause too.
        t.now = 100.0
        pacing.on_rate_limited(3.0)
        t.waits.clear()
        await pacer.acquire(1)
        assert t.waits == [3.0]

    asyncio.run(go())
    assert calls == 9
    gaps = [b - a for a, b in itertools.pairwise(sends)]
    assert all(2.0 <= g <= 2.3 for g in gaps)  # each try waits the pause, plus a little jitter


def test_429_waits_are_bounded_by_rate_limit_wait_s() -> None:
    t = FakeTime()
    calls = 0

    async def always_429() -> None:
        nonlocal calls
        calls += 1
        raise RetryableError("429", status_code=429, retry_after=10.0)

    policy = RetryPolicy(max_attempts=1, jitter_s=0.0, rate_limit_wait_s=55.0)
    with pytest.raises(RetryableError, match="429"):
        asyncio.run(call_paced(always_429, policy, None, sleep=t.sleep, rng=random.Random(0)))
    assert calls == 6  # five waits of 10 s fit in 55 s, a sixth would not
    assert t.waits == [10.0] * 5


def test_call_paced_quick_retries_while_failures_are_rare_exponential_once_common() -> None:
    t = FakeTime()
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 5:
            raise RetryableError("503", status_code=503)
        return "ok"

    policy = RetryPolicy(max_attempts=5, backoff_initial_s=1.0, jitter_s=0.0)
    rare = Pacing(None, None)  # no other request has failed: this one is unlucky
    assert asyncio.run(call_paced(flaky, policy, rare, sleep=t.sleep, rng=random.Random(3))) == "ok"
    assert all(0.05 * n <= wait <= 0.25 * n for n, wait in enumerate(t.waits, start=1))
    common = Pacing(None, None)
    for _ in range(20):
        common.on_error()  # the server is failing: back off from the first retry
    calls, t.waits = 0, []
    assert asyncio.run(call_paced(flaky, policy, common, sleep=t.sleep, rng=random.Random(3))) == "ok"
    assert t.waits == [1.0, 2.0, 4.0, 8.0]
    # max_attempts still counts the other failures.
    calls = -10
    with pytest.raises(RetryableError, match="503"):
        asyncio.run(call_paced(flaky, policy, None, sleep=t.sleep))
    assert calls == -5


def test_quick_first_retry_then_exponential() -> None:
    rng = random.Random(7)
    waits = [retry_delay(n, initial_s=1.0, max_s=60.0, jitter_s=0.0, rng=rng) for n in (1, 2, 3, 4, 5)]
    assert 0.05 <= waits[0] <= 0.25
    assert waits[1:] == [1.0, 2.0, 4.0, 8.0]
    # While failures are common across requests, backoff starts at once.
    persistent = [retry_delay(n, persistent=True, jitter_s=0.0, rng=rng) for n in (1, 2, 3)]
    assert persistent == [1.0, 2.0, 4.0]
    assert retry_delay(1, retry_after=3.0, jitter_s=0.0, rng=rng) == 3.0
    # While failures are rare across requests, one request failing again is bad luck: soon again, a step later.
    isolated = [retry_delay(n, persistent=False, jitter_s=0.0, rng=rng) for n in (1, 2, 3, 4)]
    assert all(0.05 * n <= wait <= 0.25 * n for n, wait in zip((1, 2, 3, 4), isolated, strict=True))
