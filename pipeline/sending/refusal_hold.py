"""A refused row is held until it is known whether every row gets that refusal.

A 400/413/422 may be about the row (its text is too long for the model) or about the request itself (a
wrong model name, a parameter the server rejects): then every row gets it, and writing each as its row's
error would hide a setup mistake behind thousands of failed rows. ``SameRefusal`` counts the refusals;
``RefusalHold`` keeps each refused row waiting (``hold_s`` at most) for the verdict. It is a setup error
(the caller stops the run) once enough distinct rows got the same refusal; it is the row's own error when
a success or a different refusal comes, or when no other row could settle it (every row still being
answered is held, and no more rows will come).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from pipeline.errors import RowError
from pipeline.sending.breaker import SameRefusal


async def first_of(*waits: Awaitable[Any]) -> None:
    """Wait for the first of ``waits``; the others are cancelled."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


class RefusalHold:
    """The rows being answered, those of them held on a refusal, and the one verdict they wait for."""

    def __init__(self, same_refusal: SameRefusal, hold_s: float, sleep: Callable[[float], Awaitable[Any]]) -> None:
        self.same_refusal = same_refusal
        self.hold_s = hold_s
        """The longest a refused row is held while it is not known whether every row gets that refusal."""
        self.sleep = sleep
        self._verdict: asyncio.Future[bool] | None = None
        self._active = 0  # rows being answered
        self._held = 0  # of those, rows waiting for a verdict on their refusal
        self._no_more_rows = False

    def row_started(self) -> None:
        self._active += 1

    def row_ended(self) -> None:
        self._active -= 1
        self._release_if_unresolvable()

    def no_more_rows(self) -> None:
        """Every row to send has been queued: from now on, when every active row is held, the held rows
        are row errors (``Attempts.no_more_rows``)."""
        self._no_more_rows = True
        self._release_if_unresolvable()

    def on_success(self) -> None:
        """An answer came: the server takes this setup, so a held refusal was about its row."""
        self.same_refusal.on_success()
        self._release(False)

    async def is_setup_error(self, request_hash: str, exc: RowError) -> bool:
        """Whether this refusal is one every row gets; the row waits here until that is known."""
        same = self.same_refusal
        episode = same.episode
        verdict = same.add(request_hash, exc.status_code, str(exc))
        if same.episode != episode:  # a different refusal: the rows held on the last one were row errors
            self._release(False)
        if verdict:
            self._release(True)
            return True
        if self._verdict is None:
            self._verdict = asyncio.get_running_loop().create_future()
        held = self._verdict
        self._held += 1
        try:
            self._release_if_unresolvable()
            if not held.done():
                await first_of(asyncio.shield(held), self.sleep(self.hold_s))
        finally:
            self._held -= 1
        return held.done() and not held.cancelled() and held.result()

    def _release_if_unresolvable(self) -> None:
        if self._no_more_rows and self._held and self._held == self._active:
            self._release(False)

    def _release(self, setup_error: bool) -> None:
        if self._verdict is not None:
            if not self._verdict.done():
                self._verdict.set_result(setup_error)
            self._verdict = None
