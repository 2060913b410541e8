"""Retries with exact waits (injected sleep), pacing from an empty bucket, the worker pool."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Iterator

import pytest

from pipeline.client import RateLimits
from pipeline.errors import RetryableError, RowError
from pipeline.pacing import Pacing
from pipeline.scheduler import Pacer, RetryPolicy, call_paced, run_all


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


def test_pacer_starts_smooth_no_minute_burst() -> None:
    """At 600 RPM the first second may hold at most ~10 requests, not 600."""

    async def go() -> int:
        pacer = Pacer(rpm=600, tpm=None, control=Pacing(600, None))
        loop = asyncio.get_running_loop()
        start = loop.time()
        n = 0

        async def take() -> None:
            nonlocal n
            await pacer.acquire(1)
            if loop.time() - start < 0.5:
                n += 1

        await asyncio.wait_for(asyncio.gather(*(take() for _ in range(30))), timeout=10)
        return n

    first_half_second = asyncio.run(go())
    assert first_half_second <= 16


def test_pacer_token_estimate_follows_reported_usage() -> None:
    async def go() -> None:
        pacer = Pacer(rpm=None, tpm=60_000, control=Pacing(None, 60_000))
        assert pacer.estimate(100, 200) == 300
        for _ in range(200):
            pacer.observe(100, 200, 150, 50)
        assert pacer.estimate(100, 200) == pytest.approx(150 + 50, rel=0.05)

    asyncio.run(go())  # answers arrive on the run's event loop, where the buckets live


def test_run_all_bounds_concurrency_and_delivers_every_result() -> None:
    in_flight = 0
    peak = 0
    results: dict[int, int] = {}

    async def handle(i: int) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        return i * i

    def on_result(i: int, r: int) -> None:
        results[i] = r

    asyncio.run(run_all(range(500), handle, on_result, concurrency=7))
    assert peak == 7
    assert results == {i: i * i for i in range(500)}


def test_run_all_raises_the_fatal_error_itself() -> None:
    async def handle(i: int) -> int:
        if i == 3:
            raise ValueError("fatal")
        await asyncio.sleep(0.01)
        return i

    with pytest.raises(ValueError, match="fatal"):
        asyncio.run(run_all(range(100), handle, lambda i, r: None, concurrency=4))


def test_run_all_respects_a_changing_cap() -> None:
    """The pool is the ceiling; ``limit`` gates how many are in ``handle`` at once, as it changes."""
    cap = [3]
    in_flight = 0
    peaks: dict[int, int] = {}
    done: list[int] = []

    async def handle(i: int) -> int:
        nonlocal in_flight
        in_flight += 1
        assert in_flight <= cap[0]  # never more than the cap when this one started
        peaks[cap[0]] = max(peaks.get(cap[0], 0), in_flight)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        in_flight -= 1
        if i == 100:
            cap[0] = 10
        if i == 300:
            cap[0] = 2
        return i

    def on_result(i: int, r: int) -> None:
        done.append(i)

    asyncio.run(run_all(range(500), handle, on_result, concurrency=16, limit=lambda: cap[0]))
    assert sorted(done) == list(range(500))
    assert peaks[3] == 3
    assert peaks[10] == 10
    assert peaks[2] == 2
    assert max(peaks.values()) <= 16


def test_run_all_cap_of_zero_still_makes_progress() -> None:
    results: list[int] = []
    asyncio.run(run_all(range(20), _echo, lambda i, r: results.append(r), concurrency=4, limit=lambda: 0))
    assert sorted(results) == list(range(20))


async def _echo(i: int) -> int:
    await asyncio.sleep(0)
    return i


class FakeTime:
    """A clock and a sleep that moves it: waits are recorded, never spent."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.waits.append(s)
        self.now += s


def test_retry_after_pauses_new_sends_and_does_not_count_against_max_attempts() -> None:
    t = FakeTime()
    pacing = Pacing(600, None, clock=t)
    pacer = Pacer(600, None, control=pacing, sleep=t.sleep)
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


def test_pacer_follows_the_rate_learned_from_headers() -> None:
    pacing = Pacing(12_000, None, clock=FakeTime())
    pacer = Pacer(12_000, None, control=pacing)

    async def go() -> None:
        await pacer.acquire(1)
        assert pacer.requests is not None and pacer.requests.max_rate == pytest.approx(200)
        pacing.on_reply(1.0, RateLimits(limit_requests=3000, limit_tokens=60_000))
        await pacer.acquire(1)
        assert pacer.requests.max_rate == pytest.approx(3000 / 60)
        # A 1 s token bucket, like the server's window.
        assert pacer.tokens is not None and pacer.tokens.max_rate == pytest.approx(60_000 / 60)

    asyncio.run(go())
    assert pacing.take_message() == "server limit 3000 rpm is below the job's 12000; pacing to the server"


def test_a_lower_limit_does_not_make_a_burst_taken_at_the_higher_one_wait_at_the_lower_rate() -> None:
    """A job limit 4x the server's: the opening burst filled a 200-request bucket; at the server's 47.5/s
    paying that back took ~4 s with nothing sent. The level is clamped to the new bucket instead."""
    from pipeline.scheduler import AdjustableLimiter

    async def go() -> float:
        limiter = AdjustableLimiter(200, 1.0)
        for _ in range(200):
            await limiter.acquire(1)
        limiter.set_limit(47.5)
        return limiter._level

    assert asyncio.run(go()) <= 47.5


def test_an_answer_applies_the_recovered_rate_to_requests_already_waiting() -> None:
    """Requests waiting in the bucket took its rate when they started waiting; an answer updates it."""
    from pipeline.pacing import Pacing
    from pipeline.records import RateLimits

    now = [0.0]
    pacing = Pacing(12000, None, clock=lambda: now[0])
    pacer = Pacer(12000, None, control=pacing)

    async def go() -> tuple[float, float]:
        pacer.on_rate_limited(0.0, RateLimits(limit_requests=3000))
        await pacer.acquire(1)
        assert pacer.requests is not None
        during = pacer.requests.max_rate  # 3000 × 0.7 per minute, as a 1 s bucket
        now[0] = 5.0  # no 429 since: the factor recovers
        pacer.observe(10, 10, 10, 10)
        return during, pacer.requests.max_rate

    during, after = asyncio.run(go())
    assert during == pytest.approx(3000 * 0.7 / 60)
    assert after == pytest.approx(3000 / 60)


def test_run_all_starts_workers_as_the_cap_can_use_them() -> None:
    """4,096 workers started at once held the first request back by each one's first step."""
    cap = [4]
    seen: list[tuple[int, int]] = []  # (cap, tasks alive) at each start
    handled: list[int] = []

    async def handle(i: int) -> int:
        seen.append((cap[0], len(asyncio.all_tasks())))
        if i == 50:
            cap[0] = 40  # the cap grows mid-run: more workers start
        await asyncio.sleep(0.001)
        return i

    async def on_result(i: int, r: int) -> None:
        handled.append(r)

    asyncio.run(run_all(range(300), handle, on_result, concurrency=4096, limit=lambda: cap[0]))
    assert sorted(handled) == list(range(300))
    others = 3  # the producer, the pump and the main task
    assert max(n for c, n in seen if c == 4) <= 4 + 16 + others
    assert max(n for c, n in seen) <= 40 + 16 + others
    assert max(n for c, n in seen if c == 40) > 4 + 16 + others  # all 300 items were queued: still grew


def test_run_all_hands_the_first_item_to_a_worker_before_making_the_next() -> None:
    """Making an item can be slow (rendering a chunk of rows): the first request must not wait for it."""
    events: list[str] = []

    def items() -> Iterator[int]:
        for i in range(3):
            events.append(f"made {i}")
            yield i

    async def handle(i: int) -> int:
        events.append(f"handled {i}")
        return i

    asyncio.run(run_all(items(), handle, lambda i, r: None, concurrency=4))
    assert events.index("handled 0") < events.index("made 1")


def test_a_limit_learned_mid_run_starts_its_bucket_holding_the_last_second_of_sends() -> None:
    """With no RPM in the job the first sends go out unpaced; the server's bucket has counted them."""
    from pipeline.pacing import Pacing
    from pipeline.records import RateLimits

    now = [0.0]
    pacing = Pacing(None, None, clock=lambda: now[0])
    pacer = Pacer(None, None, control=pacing)

    async def go() -> float:
        for _ in range(40):
            await pacer.acquire(1)
        pacing.rates.on_headers(RateLimits(limit_requests=3000))  # 50 a second, a 50-request bucket
        pacer.observe(10, 10, 10, 10)
        assert pacer.requests is not None
        return pacer.requests._level

    assert asyncio.run(go()) == pytest.approx(40.0, abs=0.5)  # 10 more may go at once, not 50
