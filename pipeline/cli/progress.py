"""What a person (or a log collector) sees while a job runs. Only the CLI uses this module.

At a terminal: a live rich panel. Anywhere else (cron, CI, a pipe): no animation, one log line every
``interval`` seconds, as text or JSON.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from pipeline.records import RunSummary

if TYPE_CHECKING:  # rich loads only for the live panel at a terminal: cron runs skip its import
    from rich.live import Live
    from rich.table import Table


def snapshot(summary: RunSummary, in_flight: int) -> dict[str, Any]:
    done = sum(summary.rows_by_status.values()) + summary.rows_from_ledger + summary.rows_deduplicated
    elapsed = max(time.time() - summary.started_at, 1e-9)
    sent_rate = summary.requests_sent / elapsed
    answered = sum(summary.rows_by_status.values())
    remaining = max(summary.rows_total - done, 0)
    row_rate = answered / elapsed
    return {
        "job": summary.job,
        "run_id": summary.run_id,
        "rows_done": done,
        "rows_total": summary.rows_total,
        "in_flight": in_flight,
        "requests_sent": summary.requests_sent,
        "requests_per_s": round(sent_rate, 2),
        "tokens_per_s": round((summary.prompt_tokens + summary.completion_tokens) / elapsed, 1),
        "usd_spent": round(summary.usd_spent, 6),
        "retries": summary.retries,
        "http_429": summary.http_429,
        "errors_by_kind": dict(summary.errors_by_kind),
        "eta_s": round(remaining / row_rate, 1) if row_rate > 0 else None,
    }


class Reporter:
    """Receives progress callbacks from the runner and shows them."""

    def __init__(self, *, live: bool, log_format: str = "text", stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.log_format = log_format
        self.live: Live | None = None
        if live:
            from rich.console import Console
            from rich.live import Live

            self.live = Live(console=Console(file=self.stream), refresh_per_second=4, transient=True)

    def __enter__(self) -> Reporter:
        if self.live:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.live.stop()

    def __call__(self, summary: RunSummary, in_flight: int) -> None:
        snap = snapshot(summary, in_flight)
        if self.live is not None:
            self.live.update(render_table(snap))
        else:
            self.log("progress", snap)

    def log(self, event: str, fields: dict[str, Any]) -> None:
        if self.log_format == "json":
            line = json.dumps({"ts": round(time.time(), 3), "event": event, **fields}, default=str)
        else:
            line = f"seedbatch {event}: " + " ".join(f"{k}={v}" for k, v in fields.items() if v not in (None, {}, ""))
        print(line, file=self.stream, flush=True)


def render_table(s: dict[str, Any]) -> Table:
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    t = Table.grid(padding=(0, 2))
    pct = 100.0 * s["rows_done"] / s["rows_total"] if s["rows_total"] else 100.0
    eta = f"{s['eta_s']:.0f}s" if s["eta_s"] is not None else "?"
    bar = ProgressBar(total=max(s["rows_total"], 1), completed=s["rows_done"], width=40)
    t.add_row("[bold]rows[/]", bar, f"{s['rows_done']:,}/{s['rows_total']:,} ({pct:.1f}%)", f"ETA {eta}")
    t.add_row("in flight", f"{s['in_flight']:,}", "requests/s", f"{s['requests_per_s']:.1f}")
    t.add_row("tokens/s", f"{s['tokens_per_s']:.0f}", "USD spent", f"${s['usd_spent']:.4f}")
    errors = ", ".join(f"{k}={v}" for k, v in s["errors_by_kind"].items()) or "none"
    t.add_row("retries", f"{s['retries']} (429s: {s['http_429']})", "errors", errors)
    return t
