"""How many requests may be in flight: Little's law when a rate is known, growth while it pays when not.

Pure policy: no I/O, no sleeping, time from an injected clock.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable

Clock = Callable[[], float]


class Window:
    """The last ``size`` values and their quantiles.

    The sorted copy is refreshed once ``stale_after`` values have arrived since the last sort, when a value
    falls outside the sorted range, or while the window is small; not on every value: the cap and the
    timeout read quantiles on every request, and a sort of 512 floats per request is CPU a fast run needs.
    """

    def __init__(self, size: int, stale_after: int = 16) -> None:
        self._values: collections.deque[float] = collections.deque(maxlen=size)
        self._sorted: list[float] | None = None
        self._since = 0
        self._stale_after = stale_after

    def add(self, value: float) -> None:
        self._values.append(value)
        self._since += 1
        stale = self._since >= self._stale_after or len(self._sorted or ()) < 64
        if self._sorted is not None and (stale or not self._sorted[0] <= value <= self._sorted[-1]):
            self._sorted = None  # a new extreme (a timeout, a fast answer) counts at once

    def __len__(self) -> int:
        return len(self._values)

    def quantile(self, q: float) -> float | None:
        if not self._values:
            return None
        if self._sorted is None:
            self._sorted = sorted(self._values)
            self._since = 0
        return self._sorted[min(len(self._sorted) - 1, int(q * len(self._sorted)))]


class InFlightLimit:
    """How many requests may be in flight: Little's law when a target rate is known, AIMD when not.

    With a rate: ``ceil(rate × latency quantile × headroom)`` clamped to [floor, ceiling], so a 20 s
    reasoning model at 100 req/s gets ~3,000 in flight and a 0.2 s one ~30. Before any answer, and
    with no rate, the cap starts at ``start`` and grows by one per answer while latency stays within
    ``slow_ratio`` × the best recent median and the growth buys throughput (``_pays``); when latency
    rises, it shrinks ×``decrease`` once per median latency.
    """

    def __init__(
        self,
        ceiling: int = 2048,
        *,
        floor: int = 4,
        start: int = 16,
        headroom: float = 1.5,
        quantile: float = 0.9,
        window: int = 256,
        recent: int = 16,
        slow_ratio: float = 2.0,
        decrease: float = 0.75,
        queueing_s: float = 0.25,
        period_s: float = 0.1,
        gain: float = 1.1,
        clock: Clock = time.monotonic,
    ) -> None:
        self.ceiling = max(1, ceiling)
        self.floor = max(1, min(floor, self.ceiling))
        self.headroom = headroom
        self.q = quantile
        self.slow_ratio = slow_ratio
        self.decrease = decrease
        self.clock = clock
        self.latency = Window(window)
        self._recent = Window(recent)
        self._recent_size = recent
        self._baseline: float | None = None
        self._last_cut = -math.inf
        self.first_send: float | None = None
        """When the run's first request left (``on_send``): the age the cap grows with before any answer."""
        self.queueing_s = queueing_s
        self.grown = min(max(start, self.floor), self.ceiling)
        self.period_s = period_s
        self.gain = gain
        self._period_start = clock()
        self._period_answers = 0
        self._period_cap = self.grown
        self._best_rate = 0.0
        self._improving = True

    def _pays(self, now: float) -> bool:
        """Whether growing the cap has been buying throughput (with no rate known, the cap is all there is).

        Answers are counted over periods of at least ``period_s`` (and two median latencies); while a period's
        answer rate beats the best one by ``gain`` and what had to be in flight (rate × fast latency) filled
        at least half the cap, the cap may grow to 1.5 × the cap the next period starts with. When it does not,
        more requests in flight only queue (a fast server, a client at its CPU's limit): the cap holds, and
        what it holds in flight is all a refusal can catch at once.
        ``period_s = inf`` turns the rule off.
        """
        if not math.isfinite(self.period_s):  # the rule is off: the cap follows latency alone
            return True
        self._period_answers += 1
        elapsed = now - self._period_start
        if elapsed >= self.period_s and elapsed >= 2.0 * (self._recent.quantile(0.5) or 0.0):
            rate = self._period_answers / elapsed
            # Little's law: answers/s × latency is what had to be in flight; far below the cap, the cap is not
            # what holds the rate back (a fast server: 2,000/s × 3 ms is 6), so growing it buys nothing. The
            # fast end of latencies, not the median: time queued in this client is not the server's.
            fast = self._recent.quantile(0.1) or 0.0
            binding = rate * fast >= 0.5 * self.grown
            self._improving = binding and rate > self._best_rate * self.gain
            self._best_rate = max(self._best_rate, rate)
            self._period_start, self._period_answers, self._period_cap = now, 0, self.grown
        return self._improving and self.grown < 1.5 * self._period_cap

    def on_answer(self, latency_s: float) -> None:
        self.latency.add(latency_s)
        self._recent.add(latency_s)
        now = self.clock()
        pays = self._pays(now)
        if len(self._recent) < self._recent_size:
            if pays:
                self.grown = min(self.ceiling, self.grown + 1)
            return
        median = self._recent.quantile(0.5)
        assert median is not None
        # The best median seen, forgotten slowly so a lasting change of prompts is not read as overload.
        self._baseline = median if self._baseline is None else min(median, self._baseline * 1.002)
        if median <= self.slow_ratio * self._baseline:
            if pays:
                self.grown = min(self.ceiling, self.grown + 1)
        elif now - self._last_cut >= median:
            self._last_cut = now
            self.grown = max(self.floor, int(self.grown * self.decrease))

    def on_send(self) -> None:
        if self.first_send is None:
            self.first_send = self.clock()

    def limit(self, target_rps: float | None) -> int:
        q = self.latency.quantile(self.q)
        if target_rps is None:
            return self.grown
        if q is None:
            # No answer yet: every request sent so far is still in flight, so latency is at least the age of
            # the first one. Growing with that age keeps a 20 s model from idling at ``start`` for 20 s.
            if self.first_send is None:
                return self.grown
            age = self.clock() - self.first_send + 1.0
            return min(self.ceiling, max(self.grown, math.ceil(target_rps * age * self.headroom)))
        # A slot is held from the pacer's wait to the answer, not only for the server's latency: the
        # quarter second covers that queueing (without it, a fast model's few slots hold the run below the rate).
        return min(self.ceiling, max(self.floor, math.ceil(target_rps * (q + self.queueing_s) * self.headroom)))
