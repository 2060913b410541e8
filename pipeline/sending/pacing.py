"""Closed-loop pacing: the server's headers, its 429s and the observed latency set the pace.

The job's RPM, TPM, concurrency and request timeout are ceilings, not the operating point. Pure policy:
no I/O, no sleeping, time from an injected clock. One ``Pacing`` per run (one event loop); the caller
asks it before each send and tells it what came back::

    before a send   pause_s()             > 0: wait that long (a 429's Retry-After holds every new send)
                    rpm(), tpm()          the rate buckets follow these (None: no limit known)
                    in_flight_limit()     the cap on requests in flight (run_all's ``limit``); narrow until
                                          the server's first 200, so a wrong setup costs a few requests
                    timeout_s(max_tokens) the timeout for this send (Client.send's ``timeout_s``)
                    on_send()
    on an answer    on_reply(latency_s, ratelimit, completion_tokens)
    on a 429        on_rate_limited(retry_after, ratelimit)
    on a failure    on_error(ratelimit, timed_out_s=)  timeout, dropped connection, 5xx: retryable, not a 429
    on a refusal    on_refusal()          a 4xx or a fatal answer
    between tries   failures_persist()    whether failures are common across requests (``retries`` backs off)
    to log, once    take_message()
    for the pool    add_listener(wake), next_change_s()   when the in-flight cap may have changed

The parts (``Window``, ``InFlightLimit`` in ``inflight``, ``RateControl`` in ``rates``, ``Deadline``) are
usable alone.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable

from pipeline.sending.inflight import InFlightLimit, Window
from pipeline.sending.rates import RateControl, ServerLimits

Clock = Callable[[], float]

__all__ = ["Deadline", "InFlightLimit", "Pacing", "RateControl", "ServerLimits", "Window"]


class Deadline:
    """Per-request timeout from what answers took: ``max(floor, k × quantile, max_tokens allowance)``, capped.

    The allowance is the time ``max_tokens`` take at the slow end (``rate_quantile``) of observed
    completion tokens per second, × ``token_margin``. Until ``min_samples`` answers, the cap.
    """

    def __init__(
        self,
        cap_s: float,
        *,
        floor_s: float = 10.0,
        k: float = 3.0,
        quantile: float = 0.99,
        min_samples: int = 20,
        window: int = 512,
        rate_quantile: float = 0.1,
        token_margin: float = 1.5,
    ) -> None:
        self.cap_s = cap_s
        self.floor_s = min(floor_s, cap_s)
        self.k = k
        self.q = quantile
        self.min_samples = min_samples
        self.rate_q = rate_quantile
        self.token_margin = token_margin
        self.latency = Window(window)
        self.tokens_per_s = Window(window)

    def on_answer(self, latency_s: float, completion_tokens: int | None = None) -> None:
        self.latency.add(latency_s)
        if completion_tokens and completion_tokens >= 16 and latency_s > 0:
            self.tokens_per_s.add(completion_tokens / latency_s)

    def settled(self) -> bool:
        """Enough answers seen for the timeout to follow them (before that it is the ceiling)."""
        return len(self.latency) >= self.min_samples

    def on_timeout(self, timeout_s: float) -> None:
        """A request got no answer within ``timeout_s``: it took at least that, so the next deadline widens."""
        self.latency.add(timeout_s)

    def timeout_s(self, max_tokens: int | None = None) -> float:
        if len(self.latency) < self.min_samples:
            return self.cap_s
        q = self.latency.quantile(self.q)
        assert q is not None
        timeout = max(self.floor_s, self.k * q)
        rate = self.tokens_per_s.quantile(self.rate_q)
        if max_tokens and rate:
            timeout = max(timeout, max_tokens / rate * self.token_margin)
        return min(self.cap_s, timeout)


class Pacing:
    """The whole loop for one run: ``RateControl`` + ``InFlightLimit`` + ``Deadline`` + failure rate.

    ``ceiling`` is the job's ``limits.concurrency``, ``request_timeout_s`` its timeout (both caps).
    """

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None,
        *,
        ceiling: int = 2048,
        request_timeout_s: float = 600.0,
        clock: Clock = time.monotonic,
        failure_window: int = 64,
        persistent_rate: float = 0.2,
        rates: RateControl | None = None,
        in_flight: InFlightLimit | None = None,
        deadline: Deadline | None = None,
        narrow: int = 4,
        narrow_doubling_s: float = 0.2,
    ) -> None:
        self.clock = clock
        self.rates = rates or RateControl(rpm, tpm, clock=clock)
        self.in_flight = in_flight or InFlightLimit(ceiling, clock=clock)
        self.deadline = deadline or Deadline(request_timeout_s)
        self.persistent_rate = persistent_rate
        self._outcomes: collections.deque[bool] = collections.deque(maxlen=failure_window)
        self._failed = 0
        self._tokens_per_request: float | None = None
        self.narrow = narrow
        self.narrow_doubling_s = narrow_doubling_s
        self._answered_at: float | None = None
        self._ramped = False
        self._doubted = False
        self._listeners: list[Callable[[], None]] = []

    # -- for the pool: when the in-flight cap may have changed
    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` when the cap may have changed: the run's first send, each answer."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def next_change_s(self) -> float | None:
        """Seconds until the in-flight cap may grow with time alone; None when only a send or an answer
        changes it. Time moves the cap during the start-up ramp, before the first answer when a rate is known
        (the age of the first request bounds latency from below) and while the rates recover after 429s."""
        first = self.in_flight.first_send
        if first is None:
            return None
        now = self.clock()
        candidates = [self.rates.next_change_s()]
        if not self._ramped and not (self._answered_at is None and self._doubted):
            candidates.append(self._next_doubling_s(first, now))
        target = self.target_rps()
        if target and len(self.in_flight.latency) == 0:
            candidates.append(max(0.05, 1.0 / (target * self.in_flight.headroom)))
        known = [c for c in candidates if c is not None]
        return min(known) if known else None

    def _next_doubling_s(self, first: float, now: float) -> float:
        """Seconds to the start-up ramp's next doubling (see ``_narrow``)."""
        step = self.narrow_doubling_s
        if self._answered_at is None:
            return step - (now - first) % step
        before = self._answered_at - first
        doublings = (before + 2.0 * (now - self._answered_at)) / step
        return max(0.0, ((math.floor(doublings) + 1) * step - before) / 2.0 + self._answered_at - now)

    # -- before a send
    def pause_s(self) -> float:
        return self.rates.pause_s()

    def rpm(self) -> float | None:
        return self.rates.rpm()

    def tpm(self) -> float | None:
        return self.rates.tpm()

    def target_rps(self) -> float | None:
        """Requests per second the rates allow: the RPM, or the TPM over the mean tokens of an answer."""
        rpm, tpm = self.rpm(), self.tpm()
        options = [rpm / 60.0] if rpm else []
        if tpm and self._tokens_per_request:
            options.append(tpm / 60.0 / self._tokens_per_request)
        return min(options) if options else None

    def in_flight_limit(self) -> int:
        cap = self.in_flight.limit(self.target_rps())
        return cap if self._ramped else min(cap, self._narrow())

    def _narrow(self) -> int:
        """The start of a run: ``narrow`` requests in flight, doubling every ``narrow_doubling_s`` while
        nothing has failed, so a wrong setup costs a handful of requests and a slow model is not held; after
        a failure or a refusal, before any 200, it stays at ``narrow``. From the first 200 it is where the
        time since the first send puts it, and doubles twice as fast until it no longer binds: the closed
        loop sets the cap, but a limit the first answers' headers claim is not taken at its word in one step
        (a claim of 100,000 RPM lets hundreds of requests out before the first refusal is read)."""
        first = self.in_flight.first_send
        if first is None:
            return self.narrow
        now = self.clock()
        if self._answered_at is None:
            if self._doubted:
                return self.narrow
            doublings = (now - first) / self.narrow_doubling_s
        else:  # where time had taken it at the first 200 (a fault before it does not count), then twice as fast
            doublings = (self._answered_at - first + 2.0 * (now - self._answered_at)) / self.narrow_doubling_s
        if doublings >= 20.0:
            self._ramped = True
        return int(self.narrow * 2 ** int(min(doublings, 20.0)))

    def on_refusal(self) -> None:
        """A 4xx or a fatal answer: before the first 200, the cap stays narrow."""
        self._doubted = True

    def timeout_s(self, max_tokens: int | None = None) -> float:
        return self.deadline.timeout_s(max_tokens)

    def on_send(self) -> None:
        first = self.in_flight.first_send is None
        self.rates.on_send()
        self.in_flight.on_send()
        if first:  # the cap starts growing with the first request's age
            self._changed()

    # -- what came back
    def on_reply(
        self,
        latency_s: float,
        ratelimit: ServerLimits | None = None,
        completion_tokens: int | None = None,
        total_tokens: int | None = None,
    ) -> None:
        if self._answered_at is None:
            # A 200 shows the setup works: the ramp goes on from where time has taken it, even if a random
            # fault came first (a lone 5xx among the first requests says nothing about the setup).
            self._answered_at = self.clock()
        self.rates.on_admitted()
        self.rates.on_headers(ratelimit)
        self.in_flight.on_answer(latency_s)
        self.deadline.on_answer(latency_s, completion_tokens)
        if total_tokens:
            mean = self._tokens_per_request
            self._tokens_per_request = total_tokens if mean is None else mean + 0.05 * (total_tokens - mean)
        self._outcome(False)
        self._changed()

    def on_rate_limited(self, retry_after: float | None, ratelimit: ServerLimits | None = None) -> None:
        self.rates.on_rate_limited(retry_after, ratelimit)

    def on_error(self, ratelimit: ServerLimits | None = None, *, timed_out_s: float | None = None) -> None:
        """Any retryable failure but a 429; ``timed_out_s``: the timeout it hit, if it was a timeout."""
        self.rates.on_headers(ratelimit)
        self._doubted = True
        if timed_out_s is not None:
            self.deadline.on_timeout(timed_out_s)
        self._outcome(True)

    def _outcome(self, failed: bool) -> None:
        if len(self._outcomes) == self._outcomes.maxlen:
            self._failed -= self._outcomes[0]
        self._outcomes.append(failed)
        self._failed += failed

    def failure_rate(self) -> float:
        """Share of failures among the last outcomes (answers and non-429 failures); 0 until 10 are seen."""
        return self._failed / len(self._outcomes) if len(self._outcomes) >= 10 else 0.0

    def failures_persist(self) -> bool:
        """Whether failures are common across recent requests: the server is failing, so retries back off."""
        return self.failure_rate() >= self.persistent_rate

    def take_message(self) -> str | None:
        """A line for the log, each said once (e.g. the server's limit is below the job's)."""
        return self.rates.take_message()
