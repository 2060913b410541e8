"""The run's spending limit: what was spent plus the worst case of every attempt in flight."""

from __future__ import annotations


class Budget:
    """Spent plus the worst case of attempts in flight never exceeds ``limit``.

    ``reserve`` is async so that a budget held elsewhere (a Ray actor leasing to shards) can ask for
    more without blocking the event loop.
    """

    def __init__(self, limit: float | None) -> None:
        self.limit = limit
        self.spent = 0.0
        self.reserved = 0.0

    def _fits(self, amount: float) -> bool:
        return self.limit is None or self.spent + self.reserved + amount <= self.limit

    async def reserve(self, amount: float) -> bool:
        if not self._fits(amount):
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, actual: float) -> None:
        self.reserved = max(0.0, self.reserved - reserved)
        self.spent += actual
