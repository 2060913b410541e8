"""A clock and a sleep for unit tests of code that waits: waits are recorded, never spent."""

from __future__ import annotations


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
