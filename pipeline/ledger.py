"""The SQLite ledger: every paid answer by request hash, every run, and the job lock.

It is the one source of truth for paid work: the output Parquet is rebuilt from it at the end of
every run. WAL mode with ``synchronous=NORMAL`` survives a killed process (SIGKILL, OOM) without
losing a committed answer; answers are committed in batches by the runner's flusher, and a row counts
as done only once its batch is committed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from pipeline.errors import LockedError, SpecError
from pipeline.records import Outcome, ToolCall, Usage
from pipeline.spec import LOCAL_ENDPOINT, LOCAL_MODEL

ANSWER_COLUMNS = (
    "status",
    "content",
    "reasoning_content",
    "finish_reason",
    "model",
    "response_id",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "reasoning_tokens",
    "cached_tokens",
    "credits_used",
    "usd_spent",
    "error",
    "error_kind",
    "attempts",
    "unconfirmed_attempts",
    "latency_ms",
    "tool_calls",
)
#: What the server said beyond the output's columns, kept so an OpenAI Batch output line can carry it as
#: sent: the answer's ``created`` and ``message.refusal``, the response's ``x-request-id``, and an HTTP
#: error's ``error`` object (JSON text). Not output columns: only ``job.batch_output`` reads them.
DETAIL_COLUMNS = ("created", "refusal", "request_id", "server_error")

#: In ``answers_for_rows``' rows: row number, request hash, the answer columns, then the "repeated" flag here.
_END = 2 + len(ANSWER_COLUMNS)

_ANSWERS = f"""
CREATE TABLE IF NOT EXISTS answers (
    endpoint TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    {", ".join(ANSWER_COLUMNS)},
    {", ".join(DETAIL_COLUMNS)},
    run_id TEXT,
    answered_at REAL,
    PRIMARY KEY (endpoint, request_hash)
) WITHOUT ROWID;"""
#: Every column of ``answers`` in table order (a merge copies them all).
ALL_COLUMNS = ("endpoint", "request_hash", *ANSWER_COLUMNS, *DETAIL_COLUMNS, "run_id", "answered_at")
_SCHEMA = f"""{_ANSWERS}
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    job TEXT,
    started_at REAL,
    ended_at REAL,
    exit_code INTEGER,
    summary TEXT
);
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

_IN_BATCH = 5000
#: Usage columns (prompt_tokens … usd_spent) of a row that reused an identical earlier row's answer.
_REUSED_USAGE = (0, 0, 0, 0, 0, 0.0, 0.0)


def calls_text(calls: tuple[ToolCall, ...] | None) -> str | None:
    """Function calls as the ledger keeps them: JSON ``[{id, name, arguments}]`` (the output column's fields)."""
    if calls is None:
        return None
    return orjson.dumps([{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls]).decode()


def calls_of(text: str | None) -> tuple[ToolCall, ...] | None:
    if text is None:
        return None
    return tuple(ToolCall(c["id"], c["name"], c["arguments"]) for c in orjson.loads(text))


def outcome_row(o: Outcome) -> tuple[Any, ...]:
    """An outcome's ``ANSWER_COLUMNS`` then ``DETAIL_COLUMNS`` values."""
    u = o.usage
    return (
        o.status,
        o.content,
        o.reasoning_content,
        o.finish_reason,
        o.model,
        o.response_id,
        *u.astuple(),
        o.error,
        o.error_kind,
        o.attempts,
        o.unconfirmed_attempts,
        o.latency_ms,
        calls_text(o.tool_calls),
        o.created,
        o.refusal,
        o.request_id,
        o.server_error,
    )


def row_outcome(request_hash: str, r: Sequence[Any]) -> Outcome:
    """Rebuild an ``Outcome`` from ``ANSWER_COLUMNS`` values."""
    return Outcome(
        request_hash=request_hash,
        status=r[0],
        content=r[1],
        reasoning_content=r[2],
        finish_reason=r[3],
        model=r[4],
        response_id=r[5],
        usage=Usage(*r[6:13]),
        error=r[13],
        error_kind=r[14],
        attempts=r[15] or 0,
        unconfirmed_attempts=r[16] or 0,
        latency_ms=r[17],
        tool_calls=calls_of(r[18]),
    )


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
    for column in (*ANSWER_COLUMNS, *DETAIL_COLUMNS):
        if have and column not in have:
            db.execute(f"ALTER TABLE {schema}.answers ADD COLUMN {column}")


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

        A table, not a dict: an input of 10M rows asking 1M requests ten times each has 1M repeated
        hashes, ~150 MB as Python objects. One grouped scan (an index kept up to date during 1M inserts
        cost more than the scan).
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
        columns = "coalesce(created, CAST(answered_at AS INTEGER)), refusal, request_id, server_error"
        return {r[0]: (r[1], r[2], r[3], r[4]) for r in self._lookup(hashes, columns)}

    def get(self, request_hash: str) -> Outcome | None:
        row = self.db.execute(
            f"SELECT {', '.join(ANSWER_COLUMNS)} FROM answers WHERE endpoint = ? AND request_hash = ?",
            (self.endpoint, request_hash),
        ).fetchone()
        return row_outcome(request_hash, row) if row else None

    def add(self, outcome: Outcome, run_id: str) -> None:
        """Buffer an answer; ``flush`` commits it. Nothing is counted done before that."""
        self._buffer.append((self.endpoint, outcome.request_hash, *outcome_row(outcome), run_id, time.time()))

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def flush(self) -> int:
        if not self._buffer:
            return 0
        rows, self._buffer = self._buffer, []
        marks = ",".join("?" * len(ALL_COLUMNS))
        sql = f"INSERT OR REPLACE INTO answers ({', '.join(ALL_COLUMNS)}) VALUES ({marks})"  # columns by name:
        with self._transaction():  # a migrated ledger has its added columns last
            self.db.executemany(sql, rows)
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
        cur = self.db.execute(
            f"SELECT r.row_number, r.request_hash, a.status, {', '.join('a.' + c for c in ANSWER_COLUMNS[1:])}, "
            "coalesce(u.first_row, r.row_number) != r.row_number "
            "FROM temp.row_map r LEFT JOIN answers a ON a.endpoint = ? AND a.request_hash = r.request_hash "
            "LEFT JOIN temp.repeated u ON u.request_hash = r.request_hash "
            "WHERE r.row_number BETWEEN ? AND ?",
            (self.endpoint, lo, hi),
        )
        out: dict[int, tuple[str, tuple[Any, ...] | None]] = {}
        for r in cur:
            n, h = r[0], r[1]
            if r[2] is None:
                out[n] = (h, None)
            elif r[_END]:  # a later row asking an earlier row's request: the answer, not its cost
                out[n] = (h, (*r[2:8], *_REUSED_USAGE, *r[15:17], 0, 0, *r[19:_END]))
            else:
                out[n] = (h, r[2:_END])
        return out

    def run_answers(self, run_id: str) -> set[str]:
        sql = "SELECT request_hash FROM answers WHERE endpoint = ? AND run_id = ?"
        cur = self.db.execute(sql, (self.endpoint, run_id))
        return {r[0] for r in cur}

    # Runs ------------------------------------------------------------------------------------------
    def start_run(self, run_id: str, job: str, started_at: float) -> None:
        self.db.execute("INSERT INTO runs (run_id, job, started_at) VALUES (?, ?, ?)", (run_id, job, started_at))

    def end_run(self, run_id: str, ended_at: float, exit_code: int, summary_json: str) -> None:
        self.db.execute(
            "UPDATE runs SET ended_at = ?, exit_code = ?, summary = ? WHERE run_id = ?",
            (ended_at, exit_code, summary_json, run_id),
        )

    def last_run(self) -> tuple[str, float, float | None, int | None] | None:
        row = self.db.execute(
            "SELECT run_id, started_at, ended_at, exit_code FROM runs ORDER BY started_at DESC LIMIT 1"
        ).fetchone()
        return (str(row[0]), float(row[1]), row[2], row[3]) if row else None

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


class SeenHashes:
    """A set of request hashes on disk (SQLite's private temporary database): memory stays at its page
    cache whatever the number of rows, so ``plan`` counts duplicates over 10M rows in bounded memory."""

    def __init__(self) -> None:
        self.db = sqlite3.connect("", isolation_level=None)
        self.db.execute("CREATE TABLE seen (h BLOB PRIMARY KEY) WITHOUT ROWID")

    def add_new(self, hashes: Sequence[str]) -> set[str]:
        """Add ``hashes``; return those not seen before (in this call or an earlier one)."""
        distinct = list(dict.fromkeys(hashes))
        old: set[str] = set()
        for i in range(0, len(distinct), _IN_BATCH):
            part = [bytes.fromhex(h) for h in distinct[i : i + _IN_BATCH]]
            marks = ",".join("?" * len(part))
            old.update(r[0].hex() for r in self.db.execute(f"SELECT h FROM seen WHERE h IN ({marks})", part))
        new = [h for h in distinct if h not in old]
        with contextlib.suppress(sqlite3.Error):
            self.db.execute("BEGIN")
        self.db.executemany("INSERT INTO seen VALUES (?)", [(bytes.fromhex(h),) for h in new])
        self.db.execute("COMMIT")
        return set(new)

    def close(self) -> None:
        self.db.close()


class ShardLedger(Ledger):
    """One Ray shard's own ledger file; answers in the job's main ledger count as already known.

    One writer per file, so shards on many nodes never contend for a lock. The row map is a real table
    here (not a temp one): the driver merges it to write the output.
    """

    def __init__(self, path: Path, main_path: Path, endpoint: str) -> None:
        super().__init__(path, endpoint)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS shard_rows (row_number INTEGER PRIMARY KEY, request_hash TEXT) WITHOUT ROWID"
        )
        self.main = Ledger(main_path, endpoint)  # read only here: the driver writes it after every shard ended

    def known_runs(self, hashes: Sequence[str], run_id: str | None = None) -> dict[str, tuple[str, str | None, str]]:
        found = self.main.known_runs(hashes, run_id)
        found.update(super().known_runs(hashes, run_id))  # the shard's answers are newer
        return found

    def get(self, request_hash: str) -> Outcome | None:
        return super().get(request_hash) or self.main.get(request_hash)

    def map_rows(self, pairs: Sequence[tuple[int, str]]) -> None:
        with self._transaction():
            self.db.executemany("INSERT OR REPLACE INTO shard_rows VALUES (?, ?)", pairs)

    def close(self) -> None:
        super().close()
        self.main.close()


class JobLock:
    """An exclusive ``flock`` on a file beside the ledger.

    The kernel drops the lock when its process dies, however it dies, so a stale lock from a killed
    run is simply taken over by the next one: no PID guessing, no cleanup step in cron.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SpecError(
                f"{self.path}: cannot create the job's lock file ({exc.strerror}); make its folder writable "
                "or set job.ledger to a writable place"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LockedError(
                f"{self.path}: job is already running (pid {holder}); this run exits without sending"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
