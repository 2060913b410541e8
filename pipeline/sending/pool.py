"""The worker pool: feeds items to workers, at most the in-flight cap of them in ``handle`` at once.

A fixed, lazily grown set of workers (not one task per item) keeps memory flat for millions of items.
The cap is read again whenever it can have changed, and only then: a request finishing, what the cap
follows telling the pool it changed (``CapChanges.add_listener``: a send, an answer), or the moment it
says the cap grows with time alone (``CapChanges.next_change_s``: the start-up ramp). Nothing polls.
Knows nothing of rows, files or the ledger.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")
Sleep = Callable[[float], Awaitable[Any]]

#: Workers started beyond the cap, so a cap that grows finds a worker waiting with an item.
SPARE_WORKERS = 16


class CapChanges(Protocol):
    """What the in-flight cap follows (``pacing.Pacing`` is one)."""

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever the cap may have changed."""

    def next_change_s(self) -> float | None:
        """Seconds until the cap may change with time alone; None when only an event changes it."""


class Gate:
    """At most ``limit()`` holders at once; waiters are let in, oldest first, when ``open`` finds room."""

    def __init__(self, limit: Callable[[], int], on_wait: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.active = 0
        self.on_wait = on_wait
        """Called each time a holder starts or resumes waiting: the pool arms its timer for a cap that
        grows with time (a waiter woken but overtaken by a newcomer waits again, and needs it too)."""
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def room(self) -> int:
        return max(1, self.limit()) - self.active

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def enter(self) -> None:
        if not self._waiters and self.room() > 0:
            self.active += 1
            return
        queued_before = False
        while True:
            turn = asyncio.get_running_loop().create_future()
            if queued_before:  # woken, but the cap fell before this one ran: first in line again
                self._waiters.appendleft(turn)
            else:
                self._waiters.append(turn)
            queued_before = True
            if self.on_wait is not None:
                self.on_wait()
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self.open()  # the wake this one got goes to the next in line
                raise
            if self.room() > 0:  # re-read: the cap may have changed between the wake and now
                self.active += 1
                return

    def leave(self) -> None:
        self.active -= 1
        self.open()

    def open(self) -> None:
        """Wake as many waiters as there is room for now (each counts itself in when it runs)."""
        free = self.room()
        while free > 0 and self._waiters:
            turn = self._waiters.popleft()
            if turn.done():  # cancelled while it waited
                continue
            turn.set_result(None)
            free -= 1


async def run_all(
    items: Iterable[T] | AsyncIterator[T],
    handle: Callable[[T], Awaitable[R]],
    on_result: Callable[[T, R], Awaitable[None] | None],
    *,
    concurrency: int,
    stop: asyncio.Event | None = None,
    limit: Callable[[], int] | None = None,
    changes: CapChanges | None = None,
    sleep: Sleep = asyncio.sleep,
) -> None:
    """Feed ``items`` to at most ``concurrency`` workers; call ``on_result`` as each finishes.

    When ``stop`` is set no new item starts; items already started run to completion. An exception from
    ``handle`` (a fatal error) cancels the others and is raised. With ``limit`` (e.g.
    ``Pacing.in_flight_limit``) at most ``limit()`` items are in ``handle`` at once; ``changes`` says when
    that may have changed.
    """
    pool = _Pool(items, handle, on_result, concurrency, stop, limit, changes, sleep)
    await pool.run()


class _Pool:
    def __init__(
        self,
        items: Iterable[Any] | AsyncIterator[Any],
        handle: Callable[[Any], Awaitable[Any]],
        on_result: Callable[[Any, Any], Awaitable[None] | None],
        concurrency: int,
        stop: asyncio.Event | None,
        limit: Callable[[], int] | None,
        changes: CapChanges | None,
        sleep: Sleep,
    ) -> None:
        self.items = items
        self.handle = handle
        self.on_result = on_result
        self.concurrency = concurrency
        self.stop = stop
        self.limit = limit
        self.changes = changes
        self.sleep = sleep
        # A short queue keeps the workers fed (rendering is far faster than answering) without holding
        # thousands of rendered bodies (images included) when the cap is in the thousands.
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=max(64, min(2 * concurrency, 512)))
        self.gate = Gate(limit, on_wait=lambda: self._schedule(waiting=True)) if limit is not None else None
        self.workers = 0
        self.finished = False  # every item is queued
        self.group: asyncio.TaskGroup | None = None
        self.timer: asyncio.Task[None] | None = None
        self._done = object()

    async def run(self) -> None:
        if self.changes is not None:
            self.changes.add_listener(self.wake)
        try:
            async with asyncio.TaskGroup() as tg:
                self.group = tg
                tg.create_task(self.produce())
                self.grow()
        except BaseExceptionGroup as group_error:
            # The first real error (a fatal answer, a bug) is what the caller acts on, not the group.
            errors = group_error.exceptions
            first = next((e for e in errors if not isinstance(e, asyncio.CancelledError)), errors[0])
            raise first from None
        finally:
            self.group = None
            if self.timer is not None:
                self.timer.cancel()

    def wake(self) -> None:
        """The cap may have changed: start the workers it can use and let waiters in."""
        if self.group is None:
            return
        self.grow()
        if self.gate is not None:
            self.gate.open()
            self._schedule()

    def _schedule(self, waiting: bool = False) -> None:
        """While requests wait at the gate, wake again when the cap grows with time alone.

        The timer is not in the task group: a run whose last item is done must not wait for it.
        """
        if self.timer is not None or self.changes is None or self.gate is None or self.group is None:
            return
        if not (waiting or self.gate.waiting):
            return
        delay = self.changes.next_change_s()
        if delay is not None:
            self.timer = asyncio.ensure_future(self._tick(max(0.0, delay)))

    async def _tick(self, delay: float) -> None:
        await self.sleep(delay)
        self.timer = None
        self.wake()

    def grow(self) -> None:
        """Start workers up to what the cap can use (all of ``concurrency`` without a cap): starting
        thousands at once holds the run's first request back by every worker's first step."""
        if self.group is None or (self.finished and self.queue.empty()):
            return
        want = self.concurrency
        if self.limit is not None:
            want = min(want, max(1, self.limit()) + SPARE_WORKERS)
        while self.workers < want:
            self.workers += 1
            self.group.create_task(self.work())

    async def produce(self) -> None:
        # No try/finally here: if the group is cancelled, putting the end marker into a full queue
        # nobody reads any more would hang the shutdown forever.
        if isinstance(self.items, AsyncIterator):
            async for item in self.items:
                if self.stop is not None and self.stop.is_set():
                    break
                await self.queue.put(item)
        else:
            first = True
            for item in self.items:
                if self.stop is not None and self.stop.is_set():
                    break
                await self.queue.put(item)
                if first:  # a worker sends it now: making the items behind it holds the event loop
                    first = False
                    await asyncio.sleep(0)
        self.finished = True
        await self.queue.put(self._done)

    async def work(self) -> None:
        while True:
            item = await self.queue.get()
            if item is self._done:
                self.queue.put_nowait(self._done)  # one marker ends every worker, however many started
                return
            if self.stop is not None and self.stop.is_set():
                continue
            result = await (self.handle(item) if self.gate is None else self.gated(item))
            maybe = self.on_result(item, result)
            if maybe is not None:
                await maybe

    async def gated(self, item: Any) -> Any:
        assert self.gate is not None
        if self.gate.room() <= 0 or self.gate.waiting:
            self._schedule(waiting=True)
        await self.gate.enter()
        try:
            return await self.handle(item)
        finally:
            self.gate.leave()
            self.grow()
