"""The runs log: one row per run in the ledger's file (when it started and ended, its exit code, its summary).

It sits beside the answers so ``seedbatch status`` and ``plan`` read what the last run did from the one
file that holds the job's state; it is not paid work, so the answer store does not hold its SQL.
"""

from __future__ import annotations

import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    job TEXT,
    started_at REAL,
    ended_at REAL,
    exit_code INTEGER,
    summary TEXT
);"""


class RunsLog:
    """The ``runs`` table of an open ledger connection (created if missing)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.db.executescript(SCHEMA)

    def start(self, run_id: str, job: str, started_at: float) -> None:
        self.db.execute("INSERT INTO runs (run_id, job, started_at) VALUES (?, ?, ?)", (run_id, job, started_at))

    def end(self, run_id: str, ended_at: float, exit_code: int, summary_json: str) -> None:
        self.db.execute(
            "UPDATE runs SET ended_at = ?, exit_code = ?, summary = ? WHERE run_id = ?",
            (ended_at, exit_code, summary_json, run_id),
        )

    def last(self) -> tuple[str, float, float | None, int | None] | None:
        """(run id, started, ended, exit code) of the latest run; ended and exit code are None while it
        runs or when it was killed."""
        row = self.db.execute(
            "SELECT run_id, started_at, ended_at, exit_code FROM runs ORDER BY started_at DESC LIMIT 1"
        ).fetchone()
        return (str(row[0]), float(row[1]), row[2], row[3]) if row else None
