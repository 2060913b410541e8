"""Request and token buckets: pacing from an empty bucket, following learned rates (clock and sleep injected)."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.sending.buckets import Pacer
from pipeline.sending.client import RateLimits
from pipeline.sending.pacing import Pacing
from tests.fake_time import FakeTime


def test_pacer_starts_smooth_no_minute_burst() -> None:
    """600 RPM: one second of quota at once, then one send a tenth of a second, never a minute's burst."""
    t = FakeTime()
    pacer = Pacer(rpm=600, tpm=None, control=Pacing(600, None, clock=t), clock=t, sleep=t.sleep)

    async def go() -> list[float]:
        sent: list[float] = []

        async def take() -> None:
            await pacer.acquire(1)
            sent.append(t.now)

        await asyncio.gather(*(take() for _ in range(30)))
        return sent

    sent = asyncio.run(go())
    assert sum(1 for at in sent if at < 0.5) <= 16
    assert sent[-1] == pytest.approx(2.0)  # 10 at once, then 20 at 10 a second


def test_pacer_token_estimate_follows_reported_usage() -> None:
    async def go() -> None:
        pacer = Pacer(rpm=None, tpm=60_000, control=Pacing(None, 60_000))
        assert pacer.estimate(100, 200) == 300
        for _ in range(200):
            pacer.observe(100, 200, 150, 50)
        assert pacer.estimate(100, 200) == pytest.approx(150 + 50, rel=0.05)

    asyncio.run(go())  # answers arrive on the run's event loop, where the buckets live


def test_pacer_follows_the_rate_learned_from_headers() -> None:
    pacing = Pacing(12_000, None, clock=FakeTime())
    pacer = Pacer(12_000, None, control=pacing)

    async def go() -> None:
        await pacer.acquire(1)
        assert pacer.requests is not None and pacer.requests.capacity == pytest.approx(200)
        pacing.on_reply(1.0, RateLimits(limit_requests=3000, limit_tokens=60_000))
        await pacer.acquire(1)
        assert pacer.requests.capacity == pytest.approx(3000 / 60)
        # A 1 s token bucket, like the server's window.
        assert pacer.tokens is not None and pacer.tokens.capacity == pytest.approx(60_000 / 60)

    asyncio.run(go())
    assert pacing.take_message() == "server limit 3000 rpm is below the job's 12000; pacing to the server"


def test_a_lower_limit_does_not_make_a_burst_taken_at_the_higher_one_wait_at_the_lower_rate() -> None:
    """A job limit 4x the server's: the opening burst filled a 200-request bucket; at the server's 47.5/s
    paying that back took ~4 s with nothing sent. The level is clamped to the new bucket instead."""
    from pipeline.sending.buckets import LeakyBucket

    async def go() -> float:
        limiter = LeakyBucket(200, 1.0, clock=lambda: 0.0)
        for _ in range(200):
            await limiter.acquire(1)
        limiter.set_rate(47.5)
        return limiter.level()

    assert asyncio.run(go()) <= 47.5


def test_an_answer_applies_the_recovered_rate_to_requests_already_waiting() -> None:
    """Requests waiting in the bucket took its rate when they started waiting; an answer updates it."""
    from pipeline.records import RateLimits
    from pipeline.sending.pacing import Pacing

    now = [0.0]
    pacing = Pacing(12000, None, clock=lambda: now[0])
    pacer = Pacer(12000, None, control=pacing)

    async def go() -> tuple[float, float]:
        pacer.on_rate_limited(0.0, RateLimits(limit_requests=3000))
        await pacer.acquire(1)
        assert pacer.requests is not None
        during = pacer.requests.capacity  # 3000 × 0.7 per minute, as a 1 s bucket
        now[0] = 5.0  # no 429 since: the factor recovers
        pacer.observe(10, 10, 10, 10)
        return during, pacer.requests.capacity

    during, after = asyncio.run(go())
    assert during == pytest.approx(3000 * 0.7 / 60)
    assert after == pytest.approx(3000 / 60)


def test_a_limit_learned_mid_run_starts_its_bucket_holding_the_last_second_of_sends() -> None:
    """With no RPM in the job the first sends go out unpaced; the server's bucket has counted them."""
    from pipeline.records import RateLimits
    from pipeline.sending.pacing import Pacing

    now = [0.0]
    pacing = Pacing(None, None, clock=lambda: now[0])
    pacer = Pacer(None, None, control=pacing)

    async def go() -> float:
        for _ in range(40):
            await pacer.acquire(1)
        pacing.rates.on_headers(RateLimits(limit_requests=3000))  # 50 a second, a 50-request bucket
        pacer.observe(10, 10, 10, 10)
        assert pacer.requests is not None
        return pacer.requests.level()

    assert asyncio.run(go()) == pytest.approx(40.0, abs=0.5)  # 10 more may go at once, not 50


def test_a_request_larger_than_the_bucket_still_passes_when_a_429_shrinks_the_bucket_under_it() -> None:
    """tpm 60,000 is a 1,000-token bucket: a 1,500-token request takes all of it; a 429 that halves the
    rate while it waits makes the bucket 500 tokens, and the request must take those, not wait forever."""
    from pipeline.sending.buckets import LeakyBucket

    time = FakeTime()

    async def sleep(seconds: float) -> None:  # fake time passes, and the loop lets others run meanwhile
        await time.sleep(seconds)
        await asyncio.sleep(0)

    async def go() -> float:
        bucket = LeakyBucket(1000, 1.0, clock=time, sleep=sleep)
        await bucket.acquire(1000)
        waiting = asyncio.ensure_future(bucket.acquire(1500))
        await asyncio.sleep(0)  # it is waiting for the first 1,000 to drain
        bucket.set_rate(500)
        await asyncio.wait_for(waiting, timeout=2)
        return time.now

    assert asyncio.run(go()) <= 2.0, "it passed once the shrunk bucket had drained"
