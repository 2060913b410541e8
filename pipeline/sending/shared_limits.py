"""Rate limits shared beyond one event loop: between processes on one machine, or a whole Ray cluster.

One API key has one RPM/TPM limit however many processes use it. Each process's own ``Pacer`` only
sees its own requests, so two cron jobs on one key would each spend the whole quota and provoke 429s.
The fix is one bucket all of them take from. The bucket math (``ReservationBucket``) lives here once
and has two homes: a small SQLite file (``SqliteQuota``, for processes on one machine) and a Ray actor
(``pipeline.executors.ray``, for a cluster).

Takers reserve ahead instead of polling for a free slot: a reservation moves the level below zero and
the taker sleeps until the bucket has refilled to where its request is covered. Reservations reach at
most ``HORIZON_S`` ahead, so a process that stops abandons at most that much quota, and the processes
sharing a bucket take turns within that horizon (each process lets one coroutine at a time reserve).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import SpecError
from pipeline.sending.buckets import BUCKET_SECONDS, TOKEN_BUCKET_SECONDS

#: Furthest ahead a reservation may reach; beyond it a taker sleeps and asks again.
HORIZON_S = 0.5


def default_limits_file() -> Path:
    """``$XDG_CACHE_HOME/seedbatch/limits.sqlite`` (``~/.cache`` by default): one file per user and machine."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "seedbatch" / "limits.sqlite"


@dataclass
class ReservationBucket:
    """A token bucket whose level may go below zero: the debt is what reservations ahead have taken.

    It starts empty (``level = 0``): whoever else shares the key may just have spent its quota, and an
    opening burst would make the rate measured over a short run overshoot the limit.
    """

    capacity_s: float
    level: float = 0.0
    updated: float | None = None

    def refill(self, rate: float, now: float) -> None:
        if self.updated is None or now < self.updated:  # a new bucket, or the clock went back
            self.updated = now
        self.level = min(rate * self.capacity_s, self.level + rate * (now - self.updated))
        self.updated = now

    def wait_for(self, amount: float, rate: float) -> float:
        """Seconds until ``amount`` would be covered (0 when it is now)."""
        amount = min(amount, rate * self.capacity_s)  # never ask for more than the bucket can ever hold
        short = amount - self.level
        return max(0.0, short / rate)


def reserve(
    buckets: list[tuple[ReservationBucket, float, float]], now: float, horizon_s: float = HORIZON_S
) -> tuple[bool, float]:
    """Reserve ``amount`` from every ``(bucket, rate per second, amount)`` at once, or from none.

    Returns ``(True, seconds to sleep before sending)`` when reserved, or ``(False, seconds to sleep
    before asking again)`` when the reservation would reach further ahead than ``horizon_s``.
    """
    wait = 0.0
    for bucket, rate, amount in buckets:
        bucket.refill(rate, now)
        wait = max(wait, bucket.wait_for(amount, rate))
    if wait > horizon_s + 1e-6:  # the tolerance: float dust must not make a taker sleep 1e-17 s forever
        return False, wait - horizon_s
    for bucket, rate, amount in buckets:
        bucket.level -= min(amount, rate * bucket.capacity_s)
    return True, wait


class ReservingQuota:
    """``buckets.Quota`` over a bucket held elsewhere: reserve ahead, sleep until the reservation is due.

    Subclasses say where the bucket lives (``_reserve``); the waiting is the same for all. One coroutine
    per process reserves at a time, so takers queue FIFO here instead of racing for the bucket.
    """

    factor: float = 1.0
    _turn: asyncio.Lock | None = None
    _sleep: Callable[[float], Awaitable[Any]] | None = None
    """How a taker waits (``asyncio.sleep`` unless a subclass was given another)."""

    async def _reserve(self, tokens: float) -> tuple[bool, float]:
        raise NotImplementedError

    async def take(self, tokens: float) -> None:
        """Wait until one request of ``tokens`` tokens may be sent under the shared limits."""
        if self._turn is None:
            self._turn = asyncio.Lock()  # made inside the running loop, never at import or in another loop
        sleep = self._sleep or asyncio.sleep
        async with self._turn:
            while True:
                ok, wait = await self._reserve(tokens)
                if ok:
                    break
                await sleep(wait)
        if wait > 0:
            await sleep(wait)

    def set_factor(self, factor: float) -> None:
        """After 429s this process refills at ``factor`` × the limit (see ``Pacer.on_rate_limited``)."""
        self.factor = factor


class SqliteQuota(ReservingQuota):
    """RPM/TPM shared by every process on this machine that names the same limiter.

    One row per bucket in a SQLite file; each reservation is one ``BEGIN IMMEDIATE`` transaction of a
    few microseconds (WAL, no fsync: losing the file loses nothing but a second of pacing), so it runs
    on the event loop's thread. Jobs sharing a name should set the same ``rpm``/``tpm``: each refills the
    bucket at its own configured rate.
    """

    def __init__(
        self,
        name: str,
        path: Path,
        rpm: float | None,
        tpm: float | None,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] | None = None,
    ) -> None:
        self.name = name
        self._sleep = sleep
        self.path = path
        self.rpm = rpm
        self.tpm = tpm
        self.clock = clock
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=OFF")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS buckets (name TEXT PRIMARY KEY, level REAL, updated REAL) WITHOUT ROWID"
            )
        except (OSError, sqlite3.Error) as exc:
            raise SpecError(
                f"{path}: cannot open the shared limiter file ({exc}); set limits.shared_limiter_file to a "
                "writable place"
            ) from None

    async def _reserve(self, tokens: float) -> tuple[bool, float]:
        return self._reserve_now(tokens)

    def _reserve_now(self, tokens: float) -> tuple[bool, float]:
        """One ``BEGIN IMMEDIATE`` transaction of a few microseconds: fine on the event loop's thread."""
        parts: list[tuple[str, float, float, float]] = []  # (row name, rate/s, amount, capacity seconds)
        if self.rpm:
            parts.append((f"{self.name}:requests", self.rpm / 60 * self.factor, 1.0, BUCKET_SECONDS))
        if self.tpm and tokens > 0:
            parts.append((f"{self.name}:tokens", self.tpm / 60 * self.factor, tokens, TOKEN_BUCKET_SECONDS))
        if not parts:
            return True, 0.0
        self.db.execute("BEGIN IMMEDIATE")
        try:
            buckets: list[tuple[ReservationBucket, float, float]] = []
            for row, rate, amount, capacity in parts:
                got = self.db.execute("SELECT level, updated FROM buckets WHERE name = ?", (row,)).fetchone()
                bucket = ReservationBucket(capacity, got[0], got[1]) if got else ReservationBucket(capacity)
                buckets.append((bucket, rate, amount))
            result = reserve(buckets, self.clock())
            self.db.executemany(
                "INSERT OR REPLACE INTO buckets VALUES (?, ?, ?)",
                [(row, b.level, b.updated) for (row, *_), (b, _, _) in zip(parts, buckets, strict=True)],
            )
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return result

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.db.close()
