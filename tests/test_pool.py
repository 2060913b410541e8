"""The worker pool: every item handled, the cap respected, woken by cap changes (no polling)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

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
        await asyncio.sleep(0)  # a turn of the loop, not a wait on the clock
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
        await asyncio.sleep(0)  # a turn of the loop, not a wait on the clock
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
        await asyncio.sleep(0)  # a turn of the loop, not a wait on the clock
        return i

    async def on_result(i: int, r: int) -> None:
        handled.append(r)

    asyncio.run(run_all(range(300), handle, on_result, concurrency=4096, limit=lambda: cap[0]))
    assert sorted(handled) == list(range(300))
    others = 2  # the producer and the main task (nothing polls the cap)
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


class _Ramp:
    """A cap that grows when told (``grow``) or with time (``next_change_s``), like pacing's."""

    def __init__(self, cap: list[int], every_s: float | None) -> None:
        self.cap = cap
        self.every_s = every_s
        self.listeners: list[Callable[[], None]] = []

    def add_listener(self, listener: Callable[[], None]) -> None:
        self.listeners.append(listener)

    def next_change_s(self) -> float | None:
        return self.every_s if self.cap[0] < 4 else None

    def grow(self) -> None:
        self.cap[0] = 4
        for listener in self.listeners:
            listener()


def _held_until_four_in_flight() -> tuple[Callable[[int], Awaitable[int]], list[int]]:
    """A handler whose items all wait until four are in flight at once (only a grown cap lets them)."""
    active, peak = [0], [0]
    four = asyncio.Event()

    async def handle(i: int) -> int:
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        if active[0] >= 4:
            four.set()
        await four.wait()
        active[0] -= 1
        return i

    return handle, peak


def test_a_cap_that_grows_with_time_wakes_the_pool_when_it_says_not_before() -> None:
    cap = [1]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:  # time passes only when the pool waits: the cap has grown
        waits.append(seconds)
        cap[0] = 4

    handle, peak = _held_until_four_in_flight()
    done: list[int] = []
    ramp = _Ramp(cap, every_s=0.2)
    asyncio.run(
        run_all(
            range(8),
            handle,
            lambda i, r: done.append(r),
            concurrency=8,
            limit=lambda: cap[0],
            changes=ramp,
            sleep=sleep,
        )
    )
    assert sorted(done) == list(range(8))
    assert waits == [0.2]  # one timer at the time the cap said, no polling
    assert peak[0] == 4


def test_a_cap_change_told_while_requests_are_in_flight_lets_waiters_in_at_once() -> None:
    cap = [1]
    ramp = _Ramp(cap, every_s=None)
    handle, peak = _held_until_four_in_flight()

    async def first_answers_then_handle(i: int) -> int:
        if i == 0:
            await asyncio.sleep(0)
            ramp.grow()  # pacing heard an answer (a re-asked row is still in flight): the cap grew
        return await handle(i)

    async def sleep(seconds: float) -> None:
        raise AssertionError("nothing waits on time when no time-driven change is due")

    asyncio.run(
        run_all(
            range(8),
            first_answers_then_handle,
            lambda i, r: None,
            concurrency=8,
            limit=lambda: cap[0],
            changes=ramp,
            sleep=sleep,
        )
    )
    assert peak[0] == 4


def test_a_cap_that_doubles_with_time_is_followed_all_the_way_while_nothing_finishes() -> None:
    """A slow model: nothing answers while the start-up ramp doubles the cap 4 → 128. Each doubling must
    let requests in, including waiters a newly started worker overtook (they wait again and need the
    timer too): the pool stalled at 32 for a whole latency before this was so."""
    cap = [4]
    target = 128
    waits: list[float] = []

    class Doubling:
        def add_listener(self, listener: Callable[[], None]) -> None:
            pass

        def next_change_s(self) -> float | None:
            return 0.2 if cap[0] < target else None

    async def sleep(seconds: float) -> None:  # each timer the pool sets is one doubling of the cap
        waits.append(seconds)
        await asyncio.sleep(0)
        cap[0] = min(target, cap[0] * 2)

    active, peak = [0], [0]
    all_in = asyncio.Event()

    async def handle(i: int) -> int:  # nothing answers until the whole ramp is in flight
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        if active[0] >= target:
            all_in.set()
        await all_in.wait()
        return i

    done: list[int] = []

    async def go() -> None:
        await asyncio.wait_for(
            run_all(
                range(target),
                handle,
                lambda i, r: done.append(r),
                concurrency=target,
                limit=lambda: cap[0],
                changes=Doubling(),
                sleep=sleep,
            ),
            timeout=5,
        )

    asyncio.run(go())
    assert peak[0] == target and sorted(done) == list(range(target))
    assert len(waits) == 5, waits  # 4 → 8 → 16 → 32 → 64 → 128: one timer per doubling
