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
    between tries   retry_delay(failures, retry_after, rng)
    to log, once    take_message()

The parts (``Window``, ``InFlightLimit``, ``RateControl``, ``Deadline``, ``retry_delay``) are usable alone.
"""

from __future__ import annotations

import collections
import math
import random
import time
from collections.abc import Callable
from typing import Protocol

Clock = Callable[[], float]


class ServerLimits(Protocol):
    """What pacing reads from a response's ``x-ratelimit-*`` headers (``client.RateLimits`` is one)."""

    @property
    def limit_requests(self) -> int | None: ...
    @property
    def remaining_requests(self) -> int | None: ...
    @property
    def reset_requests_s(self) -> float | None: ...
    @property
    def limit_tokens(self) -> int | None: ...
    @property
    def remaining_tokens(self) -> int | None: ...
    @property
    def reset_tokens_s(self) -> float | None: ...


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
        # quarter second covers that queueing (at 50/s and 100 ms, 8 slots held the run to 0.63 of the rate).
        return min(self.ceiling, max(self.floor, math.ceil(target_rps * (q + self.queueing_s) * self.headroom)))


def _within(times: collections.deque[float], since: float) -> int:
    """How many of ``times`` (oldest first) are at or after ``since``, counted from the newest."""
    n = 0
    for t in reversed(times):
        if t < since:
            break
        n += 1
    return n


class RateControl:
    """Requests and tokens per minute to pace at, learned from the server, and the 429 pause.

    The rate is the lowest of the job's limit and the server's (``x-ratelimit-limit-*`` × ``margin``),
    times ``factor``. A 429 holds new sends until its Retry-After, and lowers ``factor`` once per
    ``decrease_every_s``: by the share of the last second's sends that were refused, by at most
    ``1 - decrease``. Sending at X to a server that admits L refuses about 1 - L/X of them, so that
    step lands near L; a 429 that comes first in a burst finds a small share, and if 429s go on, the
    next step a second later measures all of them. A few 429s among a start-up burst (3 of 173) cost
    2% for two seconds, not 30%: the fixed ×0.7 held S5 to 70 requests/s for two seconds, ~0.3 s of
    a 20 s run. After ``recover_after_s`` without a 429 the factor grows ×``recover_step`` per second
    back to 1. With no limit known at all, a 429 starts from the send rate of the last 10 s, × ``decrease``.
    """

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None,
        *,
        clock: Clock = time.monotonic,
        margin: float = 1.0,  # 0.95 cost 5% of every run; at 1.0 the 429s stayed under 1% (make bench)
        decrease: float = 0.7,
        decrease_every_s: float = 1.0,
        min_factor: float = 0.05,
        recover_after_s: float = 2.0,
        recover_step: float = 1.5,
        default_pause_s: float = 1.0,
    ) -> None:
        self.job_rpm = rpm
        self.job_tpm = tpm
        self.clock = clock
        self.margin = margin
        self.decrease = decrease
        self.decrease_every_s = decrease_every_s
        self.min_factor = min_factor
        self.recover_after_s = recover_after_s
        self.recover_step = recover_step
        self.default_pause_s = default_pause_s
        self.server_rpm: float | None = None
        self.server_tpm: float | None = None
        self.learned_rpm: float | None = None
        self.headers_bind = True
        """False once a 429 came while the headers said requests remained: their limit is not the one
        enforced (a gateway passing on its upstream's headers), so the rate is learned from admissions."""
        self.probe_up_every_s = 4.0
        self._last_probe_up = -math.inf
        self._admits: collections.deque[float] = collections.deque(maxlen=8192)
        self._episode_start = -math.inf
        self._probe_step = 1.05
        self.counted_after = 50
        self._counted = False
        self._uncounted = 0
        self.factor = 1.0
        self.not_before = -math.inf
        self._last_429 = -math.inf
        self._last_step = -math.inf
        self._sends: collections.deque[float] = collections.deque(maxlen=4096)
        self._refusals: collections.deque[float] = collections.deque(maxlen=4096)
        self._messages: list[str] = []
        self._told: set[str] = set()

    def _base_rpm(self) -> float | None:
        server = self.server_rpm if self.headers_bind else None
        known = [r for r in (self.job_rpm, server, self.learned_rpm) if r]
        return min(known) if known else None

    def _base_tpm(self) -> float | None:
        known = [r for r in (self.job_tpm, self.server_tpm) if r]
        return min(known) if known else None

    def _recover(self, now: float) -> None:
        if (
            self.learned_rpm is not None
            and not self.headers_bind
            and now - self._last_429 >= self.probe_up_every_s
            and now - self._last_probe_up >= self.probe_up_every_s
        ):
            # A limit learned from refusals alone may be below what the server admits: probe above it, 5%
            # at first and more with each quiet step (4 s), so a refusal finds the limit without bursts of them.
            self._last_probe_up = now
            self.learned_rpm *= self._probe_step
            self._probe_step = min(1.5, 1.0 + (self._probe_step - 1.0) * 2.0)
        if self.factor < 1.0 and now - self._last_429 >= self.recover_after_s and now - self._last_step >= 1.0:
            self._last_step = now
            self.factor = min(1.0, self.factor * self.recover_step)

    def rpm(self) -> float | None:
        self._recover(self.clock())
        base = self._base_rpm()
        return None if base is None else base * self.factor

    def tpm(self) -> float | None:
        self._recover(self.clock())
        base = self._base_tpm()
        return None if base is None else base * self.factor

    def pause_s(self) -> float:
        return max(0.0, self.not_before - self.clock())

    def on_send(self) -> None:
        self._sends.append(self.clock())

    def sent_within(self, seconds: float) -> int:
        """Sends of the last ``seconds`` (at most the last 4,096)."""
        return _within(self._sends, self.clock() - seconds)

    def on_admitted(self) -> None:
        """The server took a request (an answer came): what a limit learned from refusals is measured on."""
        self._admits.append(self.clock())

    def on_headers(self, limits: ServerLimits | None) -> None:
        if limits is None:
            return
        if limits.limit_requests:
            self.server_rpm = limits.limit_requests * self.margin
            self._tell("rpm", limits.limit_requests, self.job_rpm)
            self._check_counted(limits.limit_requests, limits.remaining_requests)
        if limits.limit_tokens:
            self.server_tpm = limits.limit_tokens * self.margin
            self._tell("tpm", limits.limit_tokens, self.job_tpm)

    def _check_counted(self, limit: int, remaining: int | None) -> None:
        """Headers whose ``remaining`` never moves while this run sends fast do not count its requests (a
        gateway passing on its upstream's headers): their limit is not followed. A server that counts them
        shows ``remaining`` below the limit within its first ``counted_after`` answers sent in a second."""
        if remaining is None or not self.headers_bind or self._counted:
            return
        if remaining < limit - 1:
            self._counted = True
            return
        self._uncounted += 1
        if self._uncounted >= self.counted_after and self.sent_within(1.0) >= self.counted_after:
            self.headers_bind = False
            self._messages.append(
                f"the server's rate-limit headers do not count this run's requests (remaining stays at {remaining} "
                f"of {limit}); pacing from its answers and refusals instead"
            )

    def _tell(self, unit: str, server: float, job: float | None) -> None:
        if job is not None and job > server and unit not in self._told:
            self._told.add(unit)
            self._messages.append(f"server limit {server:g} {unit} is below the job's {job:g}; pacing to the server")

    def on_rate_limited(self, retry_after: float | None, limits: ServerLimits | None = None) -> None:
        now = self.clock()
        self.on_headers(limits)
        self.not_before = max(self.not_before, now + self._pause_for(retry_after, limits))
        if now - self._last_429 > 10.0:
            self._episode_start = now
        self._last_429 = now
        self._refusals.append(now)
        self._probe_step = 1.05
        told_room = limits is not None and (limits.remaining_requests or 0) > 0 and (limits.remaining_tokens or 1) > 0
        unknown = self.learned_rpm is not None and not self.headers_bind
        if retry_after is None and (told_room or unknown or (self._base_rpm() is None and self._base_tpm() is None)):
            self._learn_from_refusal(now, told_room)
            return
        if now - self._last_step < self.decrease_every_s:
            return  # the same burst: one decrease per burst
        self._last_step = now
        if self._base_rpm() is None and self._base_tpm() is None:
            recent = [t for t in self._sends if now - t <= 10.0]
            span = min(10.0, max(1.0, now - recent[0])) if recent else 10.0
            self.learned_rpm = max(len(recent) / span * 60.0, 6.0)
            self.factor = max(self.min_factor, self.factor * self.decrease)
            return
        sent = _within(self._sends, now - 1.0)
        refused = _within(self._refusals, now - 1.0)
        share = min(1.0, refused / sent) if sent else 1.0
        self.factor = max(self.min_factor, self.factor * max(self.decrease, 1.0 - share))

    def _learn_from_refusal(self, now: float, told_room: bool) -> None:
        """Refused with no word of when, while the headers claim room or say nothing: the enforced limit is
        unknown, so the admissions measure it. Once refusals have gone on for a second, the server's bucket
        is empty and what it admits since is its rate; at the first refusal, what it admitted in the last
        minute is the guess (a per-minute window that a burst emptied)."""
        self.headers_bind = False  # told room, or told nothing: either way the headers do not set the pace
        since = self._episode_start
        if now - since >= 1.0:
            self.learned_rpm = max(6.0, _within(self._admits, since) / (now - since) * 60.0)
        elif self.learned_rpm is None:
            self.learned_rpm = max(6.0, float(_within(self._admits, now - 60.0)))

    def _pause_for(self, retry_after: float | None, limits: ServerLimits | None) -> float:
        if retry_after is not None:
            return retry_after
        if limits is not None:
            resets = [
                reset
                for remaining, reset in (
                    (limits.remaining_requests, limits.reset_requests_s),
                    (limits.remaining_tokens, limits.reset_tokens_s),
                )
                if remaining == 0 and reset is not None
            ]
            if resets:
                return min(max(resets), 60.0)
        return self.default_pause_s

    def take_message(self) -> str | None:
        return self._messages.pop(0) if self._messages else None


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


def retry_delay(
    failures: int,
    *,
    retry_after: float | None = None,
    persistent: bool | None = None,
    quick_s: tuple[float, float] = (0.05, 0.25),
    initial_s: float = 1.0,
    max_s: float = 60.0,
    jitter_s: float = 1.0,
    rng: random.Random | None = None,
) -> float:
    """Wait before try ``failures + 1`` of one request (``failures`` ≥ 1 failures so far, 429s not counted).

    ``persistent`` is what the run knows of other requests: True when failures are common across them (the
    server is failing: exponential backoff from ``initial_s`` at once), False when they are rare (this request
    was unlucky again: retried after ``quick_s``, a step later each time; a second 1-2 s backoff for one of
    the last rows was 1-2 s of a 20 s run), None when nothing is known (a lone failure quick, exponential from
    the second).
    """
    rnd = rng or random
    if retry_after is not None:
        return retry_after + rnd.uniform(0, min(jitter_s, 0.25 + retry_after * 0.1))
    if persistent is False:
        return min(max_s, rnd.uniform(*quick_s) * failures)
    if persistent is None and failures <= 1:
        return rnd.uniform(*quick_s)
    exponent = max(failures - (1 if persistent else 2), 0)
    return min(max_s, initial_s * 2.0**exponent) + rnd.uniform(0, jitter_s)


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
        self.rates.on_send()
        self.in_flight.on_send()

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
            # fault came first (a 5xx among the first four requests held a run at 4 in flight until then).
            self._answered_at = self.clock()
        self.rates.on_admitted()
        self.rates.on_headers(ratelimit)
        self.in_flight.on_answer(latency_s)
        self.deadline.on_answer(latency_s, completion_tokens)
        if total_tokens:
            mean = self._tokens_per_request
            self._tokens_per_request = total_tokens if mean is None else mean + 0.05 * (total_tokens - mean)
        self._outcome(False)

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

    def retry_delay(
        self,
        failures: int,
        retry_after: float | None = None,
        *,
        initial_s: float = 1.0,
        max_s: float = 60.0,
        jitter_s: float = 1.0,
        rng: random.Random | None = None,
    ) -> float:
        return retry_delay(
            failures,
            retry_after=retry_after,
            persistent=self.failure_rate() >= self.persistent_rate,
            initial_s=initial_s,
            max_s=max_s,
            jitter_s=jitter_s,
            rng=rng,
        )

    def take_message(self) -> str | None:
        """A line for the log, each said once (e.g. the server's limit is below the job's)."""
        return self.rates.take_message()
