"""Retries with exact waits (injected sleep), pacing from an empty bucket, the worker pool."""

from __future__ import annotations

import asyncio
import random

import pytest

from pipeline.errors import RetryableError, RowError
from pipeline.scheduler import Pacer, RetryPolicy, call_with_retries, run_all


def test_retry_waits_honour_retry_after_then_back_off() -> None:
    waits: list[float] = []
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RetryableError("429", status_code=429, retry_after=5.0)
        if calls < 4:
            raise RetryableError("503", status_code=503)
        return "ok"

    async def sleep(s: float) -> None:
        waits.append(s)

    policy = RetryPolicy(max_attempts=5, backoff_initial_s=1.0, backoff_max_s=60, jitter_s=0.0)
    result = asyncio.run(call_with_retries(flaky, policy, sleep=sleep, rng=random.Random(1)))
    assert result == "ok"
    assert calls == 4
    assert 5.0 <= waits[0] <= 5.75  # Retry-After plus a little jitter
    assert waits[1:] == [2.0, 4.0]  # exponential on attempts 2 and 3


def test_retries_stop_and_reraise_last_error() -> None:
    waits: list[float] = []

    async def always() -> None:
        raise RetryableError("500", status_code=500)

    async def sleep(s: float) -> None:
        waits.append(s)

    policy = RetryPolicy(max_attempts=3, backoff_initial_s=1, backoff_max_s=1.5, jitter_s=0)
    with pytest.raises(RetryableError, match="500"):
        asyncio.run(call_with_retries(always, policy, sleep=sleep))
    assert waits == [1.0, 1.5]


def test_row_error_is_not_retried() -> None:
    calls = 0

    async def bad() -> None:
        nonlocal calls
        calls += 1
        raise RowError("400")

    with pytest.raises(RowError):
        asyncio.run(call_with_retries(bad, RetryPolicy(max_attempts=5)))
    assert calls == 1


def test_pacer_starts_smooth_no_minute_burst() -> None:
    """At 600 RPM the first second may hold at most ~10 requests, not 600."""

    async def go() -> int:
        pacer = Pacer(rpm=600, tpm=None)
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


def test_pacer_slows_on_429_and_recovers() -> None:
    now = [0.0]
    pacer = Pacer(rpm=600, tpm=None, clock=lambda: now[0], recover_after_s=10)

    async def go() -> None:
        pacer.on_rate_limited()
        assert pacer.factor == pytest.approx(0.8)
        pacer.on_rate_limited()  # within a second: ignored
        assert pacer.factor == pytest.approx(0.8)
        now[0] = 2.0
        pacer.on_rate_limited()
        assert pacer.factor == pytest.approx(0.64)
        now[0] = 13.0
        pacer.observe(10, 10, 10, 5)
        assert pacer.factor == pytest.approx(0.69)

    asyncio.run(go())


def test_pacer_token_estimate_follows_reported_usage() -> None:
    pacer = Pacer(rpm=None, tpm=60_000)
    assert pacer.estimate(100, 200) == 300
    for _ in range(200):
        pacer.observe(100, 200, 150, 50)
    assert pacer.estimate(100, 200) == pytest.approx(150 + 50, rel=0.05)


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
