"""How a caller runs a job: which rows, what to re-send, where progress goes, how to stop it.

``StopToken`` is the one way to stop a run from outside: the CLI's signal handlers call it, a notebook
can call it from another thread, and each executor turns it into its own stop (an ``asyncio.Event``
on its loop, a stop request to the Ray shards). Library code never installs signal handlers and never
calls ``os._exit``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.records import RunSummary, Selection

if TYPE_CHECKING:
    import httpx


class StopToken:
    """Thread-safe stop request: ``request()`` once to stop issuing (in-flight answers are kept),
    again (or ``request(hard=True)``) to abandon what is in flight after committing what arrived."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reason: str | None = None
        self.requests = 0
        self._listeners: list[Callable[[bool], None]] = []

    def request(self, reason: str = "stop requested", *, hard: bool = False) -> None:
        with self._lock:
            self.requests += 2 if hard else 1
            self.reason = self.reason or reason
            listeners = list(self._listeners)
            hard = self.requests > 1
        for listener in listeners:
            listener(hard)

    @property
    def requested(self) -> bool:
        return self.requests > 0

    def listen(self, listener: Callable[[bool], None]) -> Callable[[], None]:
        """Call ``listener(hard)`` on every request (at once if one came already); returns an unsubscribe."""
        with self._lock:
            self._listeners.append(listener)
            pending, hard = self.requests > 0, self.requests > 1
        if pending:
            listener(hard)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None


@dataclass
class RunOptions:
    """Everything about one run that is not the job: rows, re-sends, progress, stopping, the transport."""

    selection: Selection = field(default_factory=Selection)
    """Which rows of the input the run covers (default: all)."""
    retry_errors: bool = False
    """Re-send rows whose answer was final but not ok (transient errors are re-sent anyway)."""
    fresh: bool = False
    """Ignore the ledger's earlier answers and pay for every row again."""
    grace_s: float = 30.0
    """After a stop request, how long answers in flight may take before they are abandoned."""
    stop: StopToken = field(default_factory=StopToken)
    """Stops the run from outside (another thread, a signal handler): see ``StopToken``."""
    progress: Callable[[RunSummary, int], None] | None = None
    """Called about every ``progress_interval_s`` with a snapshot of the summary so far and the requests in flight."""
    progress_interval_s: float = 1.0
    """Seconds between ``progress`` calls (the CLI's ``--progress-interval``)."""
    transport: httpx.AsyncBaseTransport | None = None
    """An httpx transport for every request (``httpx.MockTransport`` in tests); default: aiohttp's pool,
    httpx's own for a small job (``client.default_transport``)."""
    log: Callable[[str], None] | None = None
    """Where one-time notices go (e.g. "the server's limit is below the job's")."""
