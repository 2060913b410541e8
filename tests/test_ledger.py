"""Ledger and job lock: real SQLite files and real processes in tmp_path."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.answers.record import ANSWER_COLUMNS, DETAIL_COLUMNS
from pipeline.errors import LockedError, SpecError
from pipeline.records import STATUSES, Outcome, ToolCall, Usage
from pipeline.state.job_lock import JobLock
from pipeline.state.ledger import Ledger, row_outcome
from pipeline.tables import writer

FULL = Outcome(
    request_hash="a" * 32,
    status="ok",
    content='{"label": "positive"}',
    reasoning_content="thinking…",
    finish_reason="stop",
    model="seed-2-0-lite-260228",
    response_id="021777553714446312d4",
    usage=Usage(
        prompt_tokens=57,
        completion_tokens=1272,
        total_tokens=1329,
        reasoning_tokens=877,
        cached_tokens=0,
        credits_used=6653.0,
        usd_spent=0.0033265,
    ),
    error=None,
    error_kind=None,
    attempts=2,
    unconfirmed_attempts=1,
    latency_ms=1234.5,
)


def _outcome(h: str, status: str = "ok", **kw: object) -> Outcome:
    return Outcome(request_hash=h, status=status, **kw)  # type: ignore[arg-type]


def test_add_flush_known_get_round_trip(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite", "test")
    err = _outcome("b" * 32, "error", error="HTTP 400: bad", error_kind="http_400", attempts=1)
    ledger.add(FULL, "run1")
    ledger.add(err, "run1")
    assert ledger.buffered == 2
    # Nothing counts as done before the batch is committed.
    assert ledger.known([FULL.request_hash]) == {}
    assert ledger.get(FULL.request_hash) is None
    assert ledger.flush() == 2
    assert ledger.buffered == 0
    assert ledger.flush() == 0
    assert ledger.known([FULL.request_hash, err.request_hash, "c" * 32]) == {
        FULL.request_hash: ("ok", None),
        err.request_hash: ("error", "http_400"),
    }
    assert ledger.get(FULL.request_hash) == FULL
    assert ledger.get(err.request_hash) == err
    assert ledger.run_answers("run1") == {FULL.request_hash, err.request_hash}
    assert ledger.run_answers("other") == set()
    ledger.close()


def test_usage_none_fields_stay_none(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite", "test")
    o = _outcome("d" * 32, usage=Usage(prompt_tokens=3))
    ledger.add(o, "r")
    ledger.flush()
    got = ledger.get(o.request_hash)
    assert got is not None
    assert got.usage == Usage(prompt_tokens=3)
    assert got.usage.usd_spent is None
    ledger.close()


def test_wal_mode_and_synchronous_normal(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    ledger = Ledger(path, "test")
    assert ledger.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ledger.db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    ledger.add(FULL, "r")
    ledger.flush()
    assert (tmp_path / "l.sqlite-wal").exists()
    # WAL is persistent: a plain connection sees it too.
    with sqlite3.connect(path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    ledger.close()


def test_reopen_after_close_keeps_answers_and_close_flushes(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "l.sqlite"  # parent folder is created
    ledger = Ledger(path, "test")
    ledger.add(FULL, "r1")
    ledger.flush()
    late = _outcome("e" * 32, "truncated", finish_reason="length")
    ledger.add(late, "r1")  # buffered only: close() must commit it
    ledger.close()
    again = Ledger(path, "test")
    assert again.get(FULL.request_hash) == FULL
    assert again.get(late.request_hash) == late
    again.close()


def test_a_committed_answer_survives_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    code = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from pipeline.state.ledger import Ledger
        from pipeline.records import Outcome
        led = Ledger(Path({str(path)!r}), "test")
        led.add(Outcome(request_hash="k" * 32, status="ok", content="kept"), "r")
        led.flush()
        led.add(Outcome(request_hash="u" * 32, status="ok", content="lost"), "r")
        os._exit(9)  # no close(), no flush of the second answer
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=False)
    assert proc.returncode == 9, proc.stderr.decode()
    ledger = Ledger(path, "test")
    got = ledger.get("k" * 32)
    assert got is not None
    assert got.content == "kept"
    assert ledger.get("u" * 32) is None
    ledger.close()


def test_known_handles_more_hashes_than_one_in_clause(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite", "test")
    hashes = [f"{i:032x}" for i in range(1203)]
    for h in hashes[::2]:
        ledger.add(_outcome(h), "r")
    ledger.flush()
    found = ledger.known(hashes)
    assert set(found) == set(hashes[::2])
    assert ledger.known([]) == {}
    ledger.close()


def test_insert_or_replace_keeps_the_latest_answer(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite", "test")
    h = "f" * 32
    ledger.add(_outcome(h, "error", error="boom"), "r1")
    ledger.flush()
    ledger.add(_outcome(h, "ok", content="fixed"), "r2")
    ledger.flush()
    got = ledger.get(h)
    assert got is not None
    assert (got.status, got.content, got.error) == ("ok", "fixed", None)
    assert ledger.run_answers("r1") == set()
    assert ledger.run_answers("r2") == {h}
    ledger.close()


def test_a_file_that_is_not_sqlite_is_a_spec_error(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    path.write_bytes(b"this is not a database, just some text that is long enough" * 20)
    with pytest.raises(SpecError) as info:
        Ledger(path, "test")
    assert str(info.value).startswith(f"{path}: cannot open ledger")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------- property: round trip over reopen

_text = st.one_of(st.none(), st.text(max_size=40))
_int = st.one_of(st.none(), st.integers(min_value=0, max_value=2**62))
_float = st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False, width=64))
_usage = st.builds(Usage, _int, _int, _int, _int, _int, _float, _float)
_outcomes = st.builds(
    Outcome,
    request_hash=st.sampled_from([f"{i:032x}" for i in range(6)]),  # small pool: repeats exercise REPLACE
    status=st.sampled_from(STATUSES[:-1]),
    content=_text,
    reasoning_content=_text,
    finish_reason=st.one_of(st.none(), st.sampled_from(["stop", "length", "content_filter"])),
    model=_text,
    response_id=_text,
    usage=_usage,
    error=_text,
    error_kind=_text,
    attempts=st.integers(min_value=0, max_value=50),
    unconfirmed_attempts=st.integers(min_value=0, max_value=50),
    latency_ms=_float,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(_outcomes, max_size=8), max_size=4))
def test_property_outcomes_read_back_equal_after_reopen(
    tmp_path_factory: pytest.TempPathFactory, batches: list[list[Outcome]]
) -> None:
    path = tmp_path_factory.mktemp("prop") / "l.sqlite"
    ledger = Ledger(path, "test")
    expected: dict[str, Outcome] = {}
    for batch in batches:
        for o in batch:
            ledger.add(o, "r")
            expected[o.request_hash] = o  # last write wins
        ledger.flush()
    ledger.close()
    again = Ledger(path, "test")
    try:
        every = [f"{i:032x}" for i in range(6)]
        assert again.known(every) == {h: (o.status, o.error_kind) for h, o in expected.items()}
        for h in every:
            assert again.get(h) == expected.get(h)
    finally:
        again.close()


# ----------------------------------------------------------------- row map


def test_answers_for_rows_maps_rows_to_answers(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite", "test")
    ledger.add(FULL, "r")
    ledger.flush()
    other = "9" * 32
    ledger.map_rows([(0, FULL.request_hash), (1, other)])
    ledger.map_rows([(2, FULL.request_hash), (7, other)])  # a second chunk adds, does not clear
    got = ledger.answers_for_rows(0, 2)
    assert set(got) == {0, 1, 2}
    h0, answer0 = got[0]
    assert h0 == FULL.request_hash
    assert answer0 is not None
    assert len(answer0) == len(ANSWER_COLUMNS)
    assert row_outcome(h0, answer0) == FULL  # tuple order is ANSWER_COLUMNS
    assert got[1] == (other, None)  # mapped but unanswered
    assert got[2][0] == FULL.request_hash
    assert set(ledger.answers_for_rows(3, 100)) == {7}
    assert ledger.answers_for_rows(8, 100) == {}
    ledger.close()


def test_row_map_is_per_connection(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    first = Ledger(path, "test")
    first.map_rows([(0, "x" * 32)])
    first.close()
    second = Ledger(path, "test")
    second.map_rows([(5, "y" * 32)])
    assert set(second.answers_for_rows(0, 10)) == {5}
    second.close()


def test_every_ledger_column_is_an_output_column() -> None:
    assert set(ANSWER_COLUMNS) | {"request_hash"} == set(writer.OUTPUT_COLUMNS)


# ----------------------------------------------------------------- runs


def test_runs_start_end_last(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    ledger = Ledger(path, "test")
    assert ledger.last_run() is None
    ledger.start_run("run-a", "job", 100.0)
    ledger.end_run("run-a", 150.0, 0, '{"ok": 1}')
    ledger.start_run("run-b", "job", 200.0)
    assert ledger.last_run() == ("run-b", 200.0, None, None)  # still running / killed
    ledger.close()
    again = Ledger(path, "test")
    again.end_run("run-b", 260.5, 3, "{}")
    assert again.last_run() == ("run-b", 200.0, 260.5, 3)
    summary = again.db.execute("SELECT job, summary FROM runs WHERE run_id = 'run-a'").fetchone()
    assert summary == ("job", '{"ok": 1}')
    again.close()


# ----------------------------------------------------------------- what is stored


def test_ledger_stores_answers_not_requests_or_keys(tmp_path: Path) -> None:
    """The table has no column for the request body or headers; the key and the prompt never reach disk."""
    key = "sk-live-DO-NOT-STORE-7731"
    prompt = "PROMPT-TEXT-only-in-the-request-body"
    path = tmp_path / "l.sqlite"
    ledger = Ledger(path, "test")
    ledger.add(
        _outcome("1" * 32, "error", error="HTTP 401: check the key in $AIMLAPI_API_KEY", error_kind="http_401"),
        "r",
    )
    ledger.add(FULL, "r")
    ledger.flush()
    cols = [r[1] for r in ledger.db.execute("PRAGMA table_info(answers)")]
    assert cols == ["endpoint", "request_hash", *ANSWER_COLUMNS, *DETAIL_COLUMNS, "run_id", "answered_at"]
    ledger.close()
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("l.sqlite"))
    assert FULL.content is not None
    assert FULL.content.encode() in blob  # sanity: the search does see stored text
    assert key.encode() not in blob
    assert prompt.encode() not in blob
    assert b"Bearer" not in blob


# ----------------------------------------------------------------- job lock


def test_second_lock_in_same_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "job.lock"
    with JobLock(path):
        assert path.read_text() == str(os.getpid())
        with pytest.raises(LockedError) as info:
            JobLock(path).acquire()
        assert str(os.getpid()) in str(info.value)
        assert info.value.exit_code == 5
    # Released: the file stays, emptied, and the lock can be taken again.
    assert path.read_text() == ""
    with JobLock(path):
        pass


def test_lock_held_by_another_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "job.lock"
    code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from pipeline.state.job_lock import JobLock
        lock = JobLock(Path({str(path)!r}))
        lock.acquire()
        print("locked", flush=True)
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"locked"
        with pytest.raises(LockedError) as info:
            JobLock(path).acquire()
        assert f"pid {proc.pid}" in str(info.value)
    finally:
        proc.communicate(timeout=30)  # closes stdin: the child exits and the kernel drops its lock
    assert proc.returncode == 0
    with JobLock(path):
        assert path.read_text() == str(os.getpid())


def test_stale_lock_file_from_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "job.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    dead_pid = int(dead.stdout)
    with pytest.raises(ProcessLookupError):
        os.kill(dead_pid, 0)
    path.write_text(str(dead_pid))
    lock = JobLock(path)
    lock.acquire()
    try:
        assert path.read_text() == str(os.getpid())
    finally:
        lock.release()


def test_lock_creates_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "job.lock"
    with JobLock(path):
        assert path.exists()


#: The ``answers`` columns of the ledgers seedbatch wrote before ``answer_record`` (untyped, in this order).
_PREVIOUS_ANSWER_COLUMNS = (
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


def _old_ledger(path: Path) -> None:
    """A ledger as written before the ``tool_calls`` column existed, holding one answer."""
    old_columns = [c for c in _PREVIOUS_ANSWER_COLUMNS if c != "tool_calls"]
    db = sqlite3.connect(path)
    db.execute(
        f"CREATE TABLE answers (endpoint TEXT NOT NULL, request_hash TEXT NOT NULL, {', '.join(old_columns)}, "
        "run_id TEXT, answered_at REAL, PRIMARY KEY (endpoint, request_hash)) WITHOUT ROWID"
    )
    db.execute(
        "INSERT INTO answers (endpoint, request_hash, status, content, attempts, run_id) VALUES (?, ?, ?, ?, ?, ?)",
        ("local", "o" * 32, "ok", "old answer", 1, "r0"),
    )
    db.commit()
    db.close()


def test_a_ledger_from_before_tool_calls_gets_the_column_and_keeps_its_answers(tmp_path: Path) -> None:
    """An older ledger has no ``tool_calls`` column: it is added (last), and writes go by column name."""
    path = tmp_path / "old.sqlite"
    _old_ledger(path)
    led = Ledger(path, "local")
    try:
        old = led.get("o" * 32)
        assert old is not None and old.content == "old answer" and old.tool_calls is None
        calls = (ToolCall("call_1", "record", '{"a": 1}'), ToolCall("call_2", "flag", "{}"))
        led.add(_outcome("n" * 32, content='{"a": 1}', tool_calls=calls, attempts=1, latency_ms=3.0), "r1")
        led.flush()
        new = led.get("n" * 32)
        assert new is not None and new.tool_calls == calls and new.latency_ms == 3.0 and new.attempts == 1
    finally:
        led.close()


def test_a_ledger_from_before_the_detail_columns_opens_and_keeps_what_the_server_said(tmp_path: Path) -> None:
    """``created``, ``refusal``, ``request_id`` and ``server_error`` are added to an older ledger; its old
    answers stand in their answer time for ``created``, new answers keep every detail as sent."""
    path = tmp_path / "old.sqlite"
    _old_ledger(path)
    db = sqlite3.connect(path)
    db.execute("UPDATE answers SET answered_at = 1767225600.75")
    db.commit()
    db.close()
    led = Ledger(path, "local")
    try:
        error = '{"message":"bad temperature","type":"invalid_request_error","param":"temperature","code":null}'
        led.add(_outcome("n" * 32, created=1767225700, refusal="I can't.", request_id="req_1"), "r1")
        led.add(_outcome("e" * 32, "error", error_kind="http_400", request_id="req_2", server_error=error), "r1")
        led.flush()
        found = led.details(["o" * 32, "n" * 32, "e" * 32, "x" * 32])
        assert found == {
            "o" * 32: (1767225600, None, None, None),
            "n" * 32: (1767225700, "I can't.", "req_1", None),
            "e" * 32: (found["e" * 32][0], None, "req_2", error),
        }
    finally:
        led.close()


def test_a_shard_ledger_from_before_tool_calls_merges(tmp_path: Path) -> None:
    """Shard ledgers a dead Ray run left behind may predate the column: their answers still merge."""
    _old_ledger(tmp_path / "shard.sqlite")
    led = Ledger(tmp_path / "main.sqlite", "local")
    try:
        assert led.merge(tmp_path / "shard.sqlite", rows=False) == 1
        merged = led.get("o" * 32)
        assert merged is not None and merged.content == "old answer" and merged.tool_calls is None
    finally:
        led.close()


def test_a_ledger_written_by_the_previous_schema_reads_back_every_field_by_name(tmp_path: Path) -> None:
    """The previous schema had untyped columns in another order: every field is still read by its name,
    for the run (``get``), the output (``answers_for_rows``) and Batch lines (``details``)."""
    path = tmp_path / "previous.sqlite"
    columns = ["endpoint", "request_hash", *_PREVIOUS_ANSWER_COLUMNS, "created", "refusal", "request_id"]
    columns += ["server_error", "run_id", "answered_at"]
    db = sqlite3.connect(path)
    db.execute(f"CREATE TABLE answers ({', '.join(columns)}, PRIMARY KEY (endpoint, request_hash)) WITHOUT ROWID")
    calls = '[{"id":"call_1","name":"record","arguments":"{}"}]'
    values = ["test", FULL.request_hash, "ok", FULL.content, FULL.reasoning_content, "stop", FULL.model]
    values += [FULL.response_id, 57, 1272, 1329, 877, 0, 6653.0, 0.0033265, None, None, 2, 1, 1234.5, calls]
    values += [1767225700, None, "req_9", None, "r0", 1767225701.5]
    db.execute(f"INSERT INTO answers VALUES ({','.join('?' * len(values))})", values)
    db.commit()
    db.close()
    led = Ledger(path, "test")
    try:
        expected = dataclasses.replace(
            FULL, tool_calls=(ToolCall("call_1", "record", "{}"),), created=1767225700, request_id="req_9"
        )
        assert led.get(FULL.request_hash) == expected
        led.map_rows([(0, FULL.request_hash)])
        ((request_hash, answer),) = led.answers_for_rows(0, 0).values()
        assert answer is not None and row_outcome(request_hash, answer) == dataclasses.replace(
            expected, created=None, request_id=None
        )
        assert led.details([FULL.request_hash]) == {FULL.request_hash: (1767225700, None, "req_9", None)}
    finally:
        led.close()


def test_a_row_reusing_an_earlier_rows_answer_shows_it_at_no_cost(tmp_path: Path) -> None:
    """Two rows asking one request: the first carries what it cost, the second the same answer at zero."""
    ledger = Ledger(tmp_path / "l.sqlite", "test")
    ledger.add(FULL, "r")
    ledger.flush()
    ledger.map_rows([(0, FULL.request_hash), (1, FULL.request_hash)])
    rows = ledger.answers_for_rows(0, 1)
    first, second = (row_outcome(*rows[n]) for n in (0, 1))  # type: ignore[arg-type]
    assert first == FULL
    assert second == dataclasses.replace(FULL, usage=Usage(0, 0, 0, 0, 0, 0.0, 0.0), attempts=0, unconfirmed_attempts=0)
    ledger.close()
