"""The rates to pace at: requests and tokens per minute learned from the server, and a 429's pause.

Pure policy: no I/O, no sleeping, time from an injected clock. ``pacing.Pacing`` composes it with the
in-flight cap and the timeouts.
"""

from __future__ import annotations

import collections
import math
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
    next step a second later measures all of them, so a few 429s in a start-up burst cost a few
    percent, not the whole ``1 - decrease``. After ``recover_after_s`` without a 429 the factor grows
    ×``recover_step`` per second back to 1. With no limit known at all, a 429 starts from the send rate
    of the last 10 s, × ``decrease``.
    """

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None,
        *,
        clock: Clock = time.monotonic,
        margin: float = 1.0,  # the server's own limit: any margin below it is throughput lost on every run
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

    def next_change_s(self) -> float | None:
        """Seconds until the rates may rise with time alone (a factor recovering, a learned limit probed
        upward); None when they are where they stay until the server says otherwise."""
        now = self.clock()
        waits = []
        if self.factor < 1.0:
            waits.append(max(self._last_429 + self.recover_after_s, self._last_step + 1.0) - now)
        if self.learned_rpm is not None and not self.headers_bind:
            waits.append(max(self._last_429, self._last_probe_up) + self.probe_up_every_s - now)
        return max(0.0, min(waits)) if waits else None

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
