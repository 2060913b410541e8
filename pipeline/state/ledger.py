"""The answer store: every paid answer by endpoint and request hash, in one SQLite file.

It is the one source of truth for paid work: the output is rebuilt (or patched) from it at the end of
every run. WAL mode with ``synchronous=NORMAL`` survives a killed process (SIGKILL, OOM) without losing
a committed answer. Answers are buffered by ``add`` and committed by ``flush``, which the local executor
calls once per event-loop turn; a row counts as done only once its answer is committed. What an answer
holds is ``answers.record``'s; the runs log in the same file is ``runs_log``'s.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.answers.record import (
    ANSWER_COLUMNS,
    DETAIL_COLUMNS,
    KEY,
    STORED_FIELDS,
    outcome_of,
    reused,
    stored_values,
)
from pipeline.errors import SpecError
from pipeline.job.spec import LOCAL_ENDPOINT, LOCAL_MODEL
from pipeline.records import Outcome
from pipeline.state.runs_log import RunsLog

__all__ = ["ALL_COLUMNS", "ANSWER_COLUMNS", "DETAIL_COLUMNS", "Ledger", "row_outcome"]

#: Columns of ``answers`` typed as ``answers.record`` says; a ledger from before the types has them untyped.
_TYPED = ",\n    ".join(f"{f.name} {f.sql}" for f in STORED_FIELDS)
_ANSWERS = f"""
CREATE TABLE IF NOT EXISTS answers (
    endpoint TEXT NOT NULL,
    {KEY} TEXT NOT NULL,
    {_TYPED},
    run_id TEXT,
    answered_at REAL,
    PRIMARY KEY (endpoint, {KEY})
) WITHOUT ROWID;"""
#: Every column of ``answers`` (a merge copies them all; SQL names them, never relies on their order).
ALL_COLUMNS = ("endpoint", KEY, *(f.name for f in STORED_FIELDS), "run_id", "answered_at")
_SCHEMA = f"""{_ANSWERS}
CREATE TABLE IF NOT EXISTS ledger_state (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    ledger_id TEXT NOT NULL,
    generation INTEGER NOT NULL
);
INSERT OR IGNORE INTO ledger_state VALUES (0, lower(hex(randomblob(8))), 0);
CREATE TRIGGER IF NOT EXISTS answers_inserted AFTER INSERT ON answers
    BEGIN UPDATE ledger_state SET generation = generation + 1; END;
CREATE TRIGGER IF NOT EXISTS answers_updated AFTER UPDATE ON answers
    BEGIN UPDATE ledger_state SET generation = generation + 1; END;
CREATE TRIGGER IF NOT EXISTS answers_deleted AFTER DELETE ON answers
    BEGIN UPDATE ledger_state SET generation = generation + 1; END;
"""

#: Hashes per ``IN (…)`` lookup: SQLite's bound-parameter limit is 32,766.
_IN_BATCH = 5000
_STORED_NAMES = tuple(f.name for f in STORED_FIELDS)
#: A detail read with a stand-in when an older seedbatch did not keep it.
_DETAIL_SQL = {"created": "coalesce(created, CAST(answered_at AS INTEGER))"}
_INSERT = f"INSERT OR REPLACE INTO answers ({', '.join(ALL_COLUMNS)}) VALUES ({','.join('?' * len(ALL_COLUMNS))})"


def row_outcome(request_hash: str, values: Sequence[Any]) -> Outcome:
    """An ``Outcome`` from ``ANSWER_COLUMNS`` values (what ``answers_for_rows`` hands the writer)."""
    return outcome_of({KEY: request_hash, **dict(zip(ANSWER_COLUMNS, values, strict=True))})


def _migrate_unkeyed(db: sqlite3.Connection, endpoint: str) -> None:
    """A ledger from before answers were keyed by endpoint: give each old answer its endpoint.

    Answers whose ``model`` is the built-in local API's are the local API's; every other old answer is
    taken to come from the endpoint of the job that opens the ledger first (the README says so).
    """
    columns = [r[1] for r in db.execute("PRAGMA table_info(answers)")]
    if not columns or "endpoint" in columns:
        return
    old = ", ".join(c for c in ALL_COLUMNS if c in columns)
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("ALTER TABLE answers RENAME TO answers_unkeyed")
        db.execute(_ANSWERS)
        db.execute(
            f"INSERT INTO answers (endpoint, {old}) SELECT CASE WHEN model = ? THEN ? ELSE ? END, {old} "
            "FROM answers_unkeyed",
            (LOCAL_MODEL, LOCAL_ENDPOINT, endpoint),
        )
        db.execute("DROP TABLE answers_unkeyed")
        # Rewritten answers are another ledger: a new id (the schema makes one), so no output built from
        # the old table counts as up to date (its triggers went with it; the copy above bumped nothing).
        db.execute("DROP TABLE IF EXISTS ledger_state")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _add_missing_columns(db: sqlite3.Connection, schema: str) -> None:
    """A ledger from before a column existed (``tool_calls``, ``created``, …) gets it, empty: its old
    answers had none (``details`` stands in ``answered_at`` for a missing ``created``)."""
    have = {r[1] for r in db.execute(f"PRAGMA {schema}.table_info(answers)")}
    for field in STORED_FIELDS:
        if have and field.name not in have:
            db.execute(f"ALTER TABLE {schema}.answers ADD COLUMN {field.name} {field.sql}")


class Ledger:
    """One connection, used from the event loop's thread only.

    ``endpoint`` (``JobSpec.endpoint_key``) scopes every read and write: the same request sent to
    another server is other paid work, and an answer is never reused across endpoints.
    """

    def __init__(self, path: Path, endpoint: str) -> None:
        self.path = path
        self.endpoint = endpoint
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA busy_timeout=10000")
            _migrate_unkeyed(self.db, endpoint)
            self.db.executescript(_SCHEMA)
            _add_missing_columns(self.db, "main")
            self.runs = RunsLog(self.db)
        except sqlite3.DatabaseError as exc:
            raise SpecError(f"{path}: cannot open ledger ({exc}); move it away or set job.ledger") from None
        except OSError as exc:
            raise SpecError(
                f"{path}: cannot create the ledger ({exc.strerror}); set job.ledger to a writable place"
            ) from None
        self._buffer: list[tuple[Any, ...]] = []
        self._mapped = False
        self._repeated_built = False  # temp.repeated is built once the row map is complete

    # Answers -------------------------------------------------------------------------------------
    def _lookup(self, hashes: Sequence[str], columns: str, run_id: str | None = None) -> Iterator[tuple[Any, ...]]:
        """``(request_hash, *columns)`` of the answered ``hashes``, looked up in batches of ``_IN_BATCH``."""
        for i in range(0, len(hashes), _IN_BATCH):
            part = [self.endpoint, *hashes[i : i + _IN_BATCH]]
            marks = ",".join("?" * (len(part) - 1))
            sql = f"SELECT request_hash, {columns} FROM answers WHERE endpoint = ? AND request_hash IN ({marks})"
            if run_id is not None:
                sql += " AND run_id = ?"
                part.append(run_id)
            yield from self.db.execute(sql, part)

    def known(self, hashes: Sequence[str], run_id: str | None = None) -> dict[str, tuple[str, str | None]]:
        """Status and error kind of each hash already answered (absent hashes are not in the dict).

        With ``run_id``, only answers from that run count (``--fresh`` ignores earlier runs, not its own).
        """
        return {h: (status, kind) for h, (status, kind, _) in self.known_runs(hashes, run_id).items()}

    def known_runs(self, hashes: Sequence[str], run_id: str | None = None) -> dict[str, tuple[str, str | None, str]]:
        """``known`` with the run that answered each: a row whose request this run answered a chunk
        earlier is a twin of that row, not a row answered by an earlier run."""
        return {r[0]: (r[1], r[2], r[3]) for r in self._lookup(hashes, "status, error_kind, run_id", run_id)}

    def known_usage(self, hashes: Sequence[str]) -> dict[str, tuple[str, int, int, float]]:
        """Status, prompt tokens, completion tokens and USD of each hash already answered, in one lookup."""
        columns = "status, coalesce(prompt_tokens, 0), coalesce(completion_tokens, 0), coalesce(usd_spent, 0)"
        return {r[0]: r[1:] for r in self._lookup(hashes, columns)}

    def _repeated(self) -> bool:
        """Fill ``temp.repeated`` (hash asked by more than one mapped row → its first row, how many rows)
        once the map is complete; False when nothing is mapped.

        A table, not a dict: repeated hashes can be as many as the rows, too many to hold as Python
        objects. One grouped scan, because an index kept up to date during every insert costs more.
        """
        if not self._mapped:
            return False
        if not self._repeated_built:
            self.db.execute("DROP TABLE IF EXISTS temp.repeated")
            self.db.execute(
                "CREATE TEMP TABLE repeated AS SELECT request_hash, MIN(row_number) AS first_row, COUNT(*) AS n "
                "FROM temp.row_map GROUP BY request_hash HAVING COUNT(*) > 1"
            )
            self.db.execute("CREATE UNIQUE INDEX temp.repeated_hash ON repeated (request_hash)")
            self._repeated_built = True
        return True

    def repeated_usage(self) -> tuple[int, int, float]:
        """Prompt tokens, completion tokens and USD counted more than once when every mapped row's answer
        is summed: each request was paid once, however many rows asked it."""
        if not self._repeated():
            return 0, 0, 0.0
        row = self.db.execute(
            "SELECT coalesce(SUM((r.n - 1) * coalesce(a.prompt_tokens, 0)), 0), "
            "coalesce(SUM((r.n - 1) * coalesce(a.completion_tokens, 0)), 0), "
            "coalesce(SUM((r.n - 1) * coalesce(a.usd_spent, 0)), 0.0) "
            "FROM temp.repeated r JOIN answers a ON a.endpoint = ? AND a.request_hash = r.request_hash",
            (self.endpoint,),
        ).fetchone()
        return int(row[0]), int(row[1]), float(row[2])

    def details(self, hashes: Sequence[str]) -> dict[str, tuple[int | None, str | None, str | None, str | None]]:
        """``DETAIL_COLUMNS`` of each answered hash; an answer from before ``created`` was kept has the
        second it was answered in its place (the server's own ``created`` is within its latency of it)."""
        columns = ", ".join(_DETAIL_SQL.get(c, c) for c in DETAIL_COLUMNS)
        return {r[0]: (r[1], r[2], r[3], r[4]) for r in self._lookup(hashes, columns)}

    def get(self, request_hash: str) -> Outcome | None:
        """The answer to ``request_hash`` as it was added, details included."""
        row = self.db.execute(
            f"SELECT {', '.join(_STORED_NAMES)} FROM answers WHERE endpoint = ? AND request_hash = ?",
            (self.endpoint, request_hash),
        ).fetchone()
        return outcome_of({KEY: request_hash, **dict(zip(_STORED_NAMES, row, strict=True))}) if row else None

    def add(self, outcome: Outcome, run_id: str) -> None:
        """Buffer an answer; ``flush`` commits it. Nothing is counted done before that."""
        self._buffer.append((self.endpoint, outcome.request_hash, *stored_values(outcome), run_id, time.time()))

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def flush(self) -> int:
        if not self._buffer:
            return 0
        rows, self._buffer = self._buffer, []
        with self._transaction():  # columns by name: a migrated ledger has its added columns last
            self.db.executemany(_INSERT, rows)
        return len(rows)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def state(self) -> tuple[str, int]:
        """(ledger id, generation): the id is random per ledger file, the generation counts every change
        to ``answers`` (SQLite triggers, so every writer counts: runs, Ray merges, a migration).

        Equal state means the same answers: an output built from them is still the ledger's.
        """
        row = self.db.execute("SELECT ledger_id, generation FROM ledger_state").fetchone()
        return str(row[0]), int(row[1])

    # Row map: which input row asked which request, for writing the output -------------------------
    def map_rows(self, pairs: Sequence[tuple[int, str]]) -> None:
        if not self._mapped:
            self.db.execute(
                "CREATE TEMP TABLE IF NOT EXISTS row_map (row_number INTEGER PRIMARY KEY, request_hash TEXT)"
            )
            self.db.execute("DELETE FROM temp.row_map")
            self._mapped = True
        self._repeated_built = False
        with self._transaction():
            self.db.executemany("INSERT OR REPLACE INTO temp.row_map VALUES (?, ?)", pairs)

    def answers_for_rows(self, lo: int, hi: int) -> dict[int, tuple[str, tuple[Any, ...] | None]]:
        """row_number → (request_hash, answer columns or None) for mapped rows in [lo, hi].

        A row whose request is identical to an earlier row's reused that answer without a request of
        its own: it gets the answer with zero usage, cost and attempts, so the output's cost columns
        sum to what was paid.
        """
        self._repeated()
        out: dict[int, tuple[str, tuple[Any, ...] | None]] = {}
        for r in self.db.execute(_ANSWERS_FOR_ROWS, (self.endpoint, lo, hi)):
            n, h = r[0], r[1]
            if not r[2]:  # mapped, not answered
                out[n] = (h, None)
            elif r[3]:  # a later row asking an earlier row's request: the answer, not its cost
                out[n] = (h, reused(r[4:]))
            else:
                out[n] = (h, r[4:])
        return out

    def run_answers(self, run_id: str) -> set[str]:
        sql = "SELECT request_hash FROM answers WHERE endpoint = ? AND run_id = ?"
        cur = self.db.execute(sql, (self.endpoint, run_id))
        return {r[0] for r in cur}

    # Runs: the runs log shares the file (``self.runs``); these keep one handle for the runner ----------
    def start_run(self, run_id: str, job: str, started_at: float) -> None:
        self.runs.start(run_id, job, started_at)

    def end_run(self, run_id: str, ended_at: float, exit_code: int, summary_json: str) -> None:
        self.runs.end(run_id, ended_at, exit_code, summary_json)

    def last_run(self) -> tuple[str, float, float | None, int | None] | None:
        return self.runs.last()

    # Merging another ledger (a Ray shard's) ----------------------------------------------------------
    def merge(self, path: Path, *, rows: bool) -> int:
        """Copy another ledger's answers (with ``rows`` its row map too) into this one; newer answers win."""
        db = self.db
        self.flush()
        db.execute("ATTACH DATABASE ? AS shard", (str(path),))
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM shard.sqlite_master WHERE type = 'table'")}
            if "answers" not in tables:
                return 0
            _add_missing_columns(db, "shard")  # a shard left by an older seedbatch
            with self._transaction():
                copied = int(db.execute(_MERGE_SQL).rowcount)
            if rows and "shard_rows" in tables:
                cur = db.execute("SELECT row_number, request_hash FROM shard.shard_rows")
                while batch := cur.fetchmany(50_000):
                    self.map_rows(batch)
            return copied
        finally:
            db.execute("DETACH DATABASE shard")

    def merge_leftovers(self, folder: Path) -> int:
        """Answers a Ray run paid for but never merged (its driver died): merged here, then deleted."""
        copied = sum(self.merge(path, rows=False) for path in sorted(folder.glob("*.sqlite")))
        shutil.rmtree(folder, ignore_errors=True)
        return copied

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.flush()
        self.db.close()


#: Newer answer wins: another ledger's answer replaces this one's only if it was answered later.
_MERGE_SQL = (
    f"INSERT INTO main.answers ({', '.join(ALL_COLUMNS)}) SELECT {', '.join(ALL_COLUMNS)} FROM shard.answers "
    "WHERE true ON CONFLICT (endpoint, request_hash) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in ALL_COLUMNS[2:])
    + " WHERE excluded.answered_at >= answers.answered_at"
)

#: Each mapped row's number and request hash, whether that request is answered, whether an earlier row
#: asks it too, then the answer's ``ANSWER_COLUMNS``.
_ANSWERS_FOR_ROWS = (
    "SELECT r.row_number, r.request_hash, a.request_hash IS NOT NULL, "
    "coalesce(u.first_row, r.row_number) != r.row_number, "
    + ", ".join(f"a.{c}" for c in ANSWER_COLUMNS)
    + " FROM temp.row_map r LEFT JOIN answers a ON a.endpoint = ? AND a.request_hash = r.request_hash "
    "LEFT JOIN temp.repeated u ON u.request_hash = r.request_hash "
    "WHERE r.row_number BETWEEN ? AND ?"
)
