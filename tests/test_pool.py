"""The worker pool: every item handled, the cap respected, woken by cap changes (no polling)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from pipeline.sending.pool import run_all


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
