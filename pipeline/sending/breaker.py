"""Failure that is not random: a provider that is down, and a refusal every row gets.

Random faults are retried row by row (``attempts``). Failure that is systematic must be told apart,
or a nightly job hammers a dead server for hours and turns every row into an error:

- ``Circuit``: when nearly every recent request fails (5xx, a 200 that is not a completion, refused or
  timed-out connections) across several rows, the circuit opens. No row is sent while it is open; one
  probe goes out at growing intervals; a success closes it. The failures while it is open use up no
  row's attempts, so the rows stay pending. After ``outage_wait_s`` open, the run gives up.
- ``SameRefusal``: the same 4xx (status and message) for several distinct rows in a row, when it is
  not about the row itself (context, content, media), is a setup error: a wrong model, key or field.

Pure policy: no I/O, no sleeping, time from an injected clock.
"""

from __future__ import annotations

import collections
import math
import re
import time
from collections.abc import Callable

Clock = Callable[[], float]


class Circuit:
    """Open when nearly every recent request failed across rows; probe at growing intervals; close on a success.

    Trips when, with no success seen yet, ``first_failures`` failures came from ``min_rows`` distinct rows,
    or when ``trip_failures`` of the last ``window`` outcomes failed across ``min_rows`` rows. A 5% fault rate
    makes 18 failures in 20 a chance of about 1e-20; a server that fails everything trips it in a handful.
    """

    def __init__(
        self,
        *,
        outage_wait_s: float = 600.0,
        window: int = 20,
        trip_failures: int = 18,
        first_failures: int = 6,
        min_rows: int = 3,
        probe_first_s: float = 1.0,
        probe_max_s: float = 60.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.outage_wait_s = outage_wait_s
        self.trip_failures = trip_failures
        self.first_failures = first_failures
        self.min_rows = min_rows
        self.probe_first_s = probe_first_s
        self.probe_max_s = probe_max_s
        self.clock = clock
        self._recent: collections.deque[str | None] = collections.deque(maxlen=window)  # failed row, or None
        self._succeeded = False
        self.opened_at: float | None = None
        self.interval = probe_first_s
        self.next_probe_at = math.inf
        self.probing = False
        self.probes = 0
        self.outages = 0
        self.last_failure: str | None = None

    def is_open(self) -> bool:
        return self.opened_at is not None

    def on_success(self) -> bool:
        """The server answered (a completion, or a 4xx about the request): True when this closed the circuit."""
        self._succeeded = True
        self._recent.append(None)
        if self.opened_at is None:
            return False
        self.opened_at = None
        self.probing = False
        self.interval = self.probe_first_s
        self.next_probe_at = math.inf
        return True

    def on_failure(self, row: str, message: str, *, probe: bool = False) -> None:
        """A request failed in a way a server that is down fails (not a 429, not a 4xx)."""
        self.last_failure = message
        now = self.clock()
        if self.opened_at is not None:
            if probe:
                self.probing = False
                self.interval = min(self.probe_max_s, self.interval * 2.0)
                self.next_probe_at = now + self.interval
            return
        self._recent.append(row)
        failed = [r for r in self._recent if r is not None]
        needed = self.trip_failures if self._succeeded else self.first_failures
        if len(failed) >= needed and len(set(failed)) >= min(self.min_rows, len(failed)):
            self.opened_at = now
            self.outages += 1
            self.interval = self.probe_first_s
            self.next_probe_at = now + self.interval
            self._recent.clear()

    def claim_probe(self) -> float:
        """0.0: the caller sends the probe now; else seconds until one may be claimed (inf: one is out)."""
        if self.opened_at is None:
            return 0.0
        if self.probing:
            return math.inf
        wait = self.next_probe_at - self.clock()
        if wait > 0:
            return wait
        self.probing = True
        self.probes += 1
        return 0.0

    def probe_abandoned(self) -> None:
        """The probe was never sent (the run is stopping): the next caller may probe."""
        self.probing = False

    def open_for_s(self) -> float:
        return 0.0 if self.opened_at is None else self.clock() - self.opened_at

    def gave_up(self) -> bool:
        """Open for ``outage_wait_s`` without a success (at once when it is 0)."""
        return self.opened_at is not None and self.open_for_s() >= self.outage_wait_s

    def until_give_up_s(self) -> float:
        return math.inf if self.opened_at is None else max(0.0, self.outage_wait_s - self.open_for_s())


#: Words in a 4xx that make it about the row, not the setup: the row's size, its content, its media.
_ABOUT_THE_ROW = re.compile(
    r"context|too long|too large|maximum .*tokens|length|content.?(policy|filter|management)|safety|moderat|"
    r"flagged|image|video|audio|media|file|base64|mime|url",
    re.IGNORECASE,
)


def about_the_row(status: int | None, message: str) -> bool:
    """Whether a 4xx refuses this row for what is in it (413, context, content policy, a bad image)."""
    return status == 413 or bool(_ABOUT_THE_ROW.search(message))


class SameRefusal:
    """The same refusal for ``rows_needed`` distinct rows in a row, with no success between: a setup error.

    Before the first success ``rows_needed`` rows decide it (a wrong model or key shows in a handful of
    requests); after one, ``rows_needed_later``. ``add`` answers True (a setup error) or None (not known
    yet: the caller holds the row). Rows held so far are row errors after all when ``episode`` moves on
    (a different refusal came) or a success comes (``on_success``).
    """

    def __init__(self, rows_needed: int = 3, rows_needed_later: int = 10) -> None:
        self.rows_needed = max(1, rows_needed)
        self.rows_needed_later = max(self.rows_needed, rows_needed_later)
        self.episode = 0
        self._succeeded = False
        self._key: tuple[int | None, str] | None = None
        self._rows: set[str] = set()

    def on_success(self) -> None:
        self._succeeded = True
        self._key = None
        self._rows = set()
        self.episode += 1

    def add(self, row: str, status: int | None, message: str) -> bool | None:
        key = (status, message)
        if key != self._key:
            if self._key is not None:
                self.episode += 1
            self._key, self._rows = key, set()
        self._rows.add(row)
        needed = self.rows_needed_later if self._succeeded else self.rows_needed
        return True if len(self._rows) >= needed else None
