"""The limits one Ray job shares across its shards: the ``ClusterLimits`` actor (one RPM/TPM, one budget,
stop requests and progress) and the shard-side ``RayQuota`` and ``LeasedBudget`` that draw on it.

Nothing here imports Ray: the driver makes ``ClusterLimits`` an actor (``ray.remote``) and hands the
shards its handle, whose methods they call with ``.remote``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pipeline.sending.buckets import BUCKET_SECONDS, TOKEN_BUCKET_SECONDS
from pipeline.sending.budget import Budget
from pipeline.sending.shared_limits import ReservationBucket, ReservingQuota, reserve

#: Budget leases: this fraction of ``max_cost_usd`` per shard at a time, so few calls reach the actor
#: and little budget sits unused in one shard while another is refused.
LEASE_FRACTION = 0.1


class ClusterLimits:
    """The job's one RPM/TPM and one budget, for every shard on every node (a Ray actor).

    Pacing is the reservation bucket of ``shared_limits``; the actor's clock is the only one that
    matters, and it answers with relative waits, so node clocks need not agree. It also relays stop
    requests from the driver and progress from the shards.
    """

    def __init__(self, rpm: float | None, tpm: float | None, budget_usd: float | None) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.factor = 1.0
        self.requests = ReservationBucket(BUCKET_SECONDS)
        self.tokens = ReservationBucket(TOKEN_BUCKET_SECONDS)
        self.budget_usd = budget_usd
        self.leased = 0.0
        self.stop_requested = False
        self.progress: dict[int, dict[str, Any]] = {}
        self.attempts: dict[tuple[int, str], dict[str, Any]] = {}
        self.finished: set[tuple[int, str]] = set()

    def reserve(self, tokens: float) -> tuple[bool, float]:
        parts: list[tuple[ReservationBucket, float, float]] = []
        if self.rpm:
            parts.append((self.requests, self.rpm / 60 * self.factor, 1.0))
        if self.tpm and tokens > 0:
            parts.append((self.tokens, self.tpm / 60 * self.factor, tokens))
        return reserve(parts, time.monotonic()) if parts else (True, 0.0)

    def set_factor(self, factor: float) -> None:
        self.factor = factor

    def lease(self, want: float) -> float:
        """Up to ``want`` USD of the budget for one shard; 0 once it is all leased."""
        if self.budget_usd is None:
            return want
        grant = max(0.0, min(want, self.budget_usd - self.leased))
        self.leased += grant
        return grant

    def give_back(self, amount: float) -> None:
        self.leased = max(0.0, self.leased - amount)

    def request_stop(self) -> None:
        self.stop_requested = True

    def heartbeat(self, shard: int, progress: dict[str, Any], attempt: str = "", final: bool = False) -> bool:
        """A shard's counters so far; returns whether the driver asked every shard to stop.

        Kept per attempt too: an attempt lost with its node returns no summary, and its last heartbeat
        is what the driver knows of the requests it sent (the server received and may have billed them).
        """
        self.progress[shard] = progress
        self.attempts[(shard, attempt)] = progress
        if final:
            self.finished.add((shard, attempt))
        return self.stop_requested

    def all_progress(self) -> dict[int, dict[str, Any]]:
        return self.progress

    def lost_attempts(self) -> list[dict[str, Any]]:
        """The last heartbeat of every shard attempt that never finished (its node or worker was lost)."""
        return [fields for key, fields in self.attempts.items() if key not in self.finished]


class RayQuota(ReservingQuota):
    """``buckets.Quota`` backed by the ``ClusterLimits`` actor: one reservation in flight per shard."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def _reserve(self, tokens: float) -> tuple[bool, float]:
        ok, wait = await self.actor.reserve.remote(tokens)
        return bool(ok), float(wait)

    def set_factor(self, factor: float) -> None:
        super().set_factor(factor)
        self.actor.set_factor.remote(factor)


class LeasedBudget(Budget):
    """A shard's budget: leases from the actor's one budget, so the job's ``max_cost_usd`` holds in sum.

    A lease is one awaited actor call per ``LEASE_FRACTION`` of the budget, never a blocking ``ray.get``.
    """

    def __init__(self, actor: Any, total: float) -> None:
        super().__init__(limit=0.0)
        self.actor = actor
        self.chunk = total * LEASE_FRACTION
        # One lease at a time: requests starting together would each lease a chunk, so one shard could take
        # the whole budget and the others stop on "budget" with rows left.
        self._leasing = asyncio.Lock()

    async def reserve(self, amount: float) -> bool:
        if not self._fits(amount):
            async with self._leasing:
                assert self.limit is not None
                short = self.spent + self.reserved + amount - self.limit  # another waiter may have leased
                if short > 0:
                    self.limit += float(await self.actor.lease.remote(max(short, self.chunk)))
        return await super().reserve(amount)

    def unused(self) -> float:
        assert self.limit is not None
        return max(0.0, self.limit - self.spent - self.reserved)
