"""Up-to-date reruns: the manifest records what the output was built from; an unchanged job does nothing.

Each case runs ``seedbatch run`` (in-process CLI) against the local API on loopback, with a real CSV
input, a real SQLite ledger and a real Parquet output, and checks what the server received and whether
the output file was rewritten.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import polars as pl
from click.testing import CliRunner, Result

from pipeline.cli import main
from pipeline.job.spec import load_spec
from pipeline.localapi import LocalAPI
from pipeline.planning import job_status, plan_job
from pipeline.records import ExitCode
from pipeline.state.ledger import Ledger
from pipeline.state.seen_hashes import SeenHashes
from tests.helpers import reviews, write_job

OUTPUT = ("out", "result.parquet")


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, [*args[:1], *args[1:], "--no-progress"] if args[0] == "run" else list(args))


def received(api: LocalAPI) -> int:
    return int(api.stats()["received"])


def mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


def manifest(tmp_path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((tmp_path.joinpath(*OUTPUT).parent / "result.parquet.manifest.json").read_text())
    return data


def first_run(tmp_path: Path, api: LocalAPI, frame: pl.DataFrame | None = None, **sections: Any) -> Path:
    job = write_job(tmp_path, api, frame if frame is not None else reviews(30), **sections)
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    api.reset()
    return job


def test_unchanged_rerun_says_so_in_one_line_and_rewrites_nothing(tmp_path: Path, api: LocalAPI) -> None:
    job = first_run(tmp_path, api)
    output = tmp_path.joinpath(*OUTPUT)
    before, manifest_before = mtime(output), manifest(tmp_path)
    assert manifest_before["built_from"]["ledger"]["generation"] == 30
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seedbatch up_to_date:"), result.output
    assert received(api) == 0
    assert mtime(output) == before
    assert manifest(tmp_path) == manifest_before  # the record still names the run that built the output


def test_input_touched_with_the_same_bytes_is_still_up_to_date(tmp_path: Path, api: LocalAPI) -> None:
    job = first_run(tmp_path, api)
    output, data = tmp_path.joinpath(*OUTPUT), tmp_path / "input.csv"
    before = mtime(output)
    reviews(30).write_csv(data)  # rewritten: a new mtime, the same bytes
    os.utime(data, ns=(mtime(data) + 5_000_000_000, mtime(data) + 5_000_000_000))
    result = cli("run", str(job))
    assert "up_to_date" in result.output and result.exit_code == 0
    assert received(api) == 0 and mtime(output) == before


def fields(result: Result, event: str) -> dict[str, str]:
    """The ``key=value`` fields of the CLI's ``seedbatch EVENT:`` line."""
    line = next(line for line in result.output.splitlines() if line.startswith(f"seedbatch {event}:"))
    return dict(item.split("=", 1) for item in line.split(": ", 1)[1].split())


def test_an_input_replaced_keeping_size_and_mtime_is_not_up_to_date(tmp_path: Path, api: LocalAPI) -> None:
    """``cp -p``, ``rsync -a`` and ``tar`` keep a file's size and mtime: only its bytes say it changed."""
    job = first_run(tmp_path, api)
    data = tmp_path / "input.csv"
    old_size, old_mtime = data.stat().st_size, mtime(data)
    replacement = tmp_path / "elsewhere" / "input.csv"
    replacement.parent.mkdir()
    frame = reviews(30)
    edited = frame.with_columns(text=pl.col("text").str.replace("described", "DESCRIBED", literal=True))
    edited.head(1).vstack(frame.tail(29)).write_csv(replacement)  # row 0 changed, same length
    os.utime(replacement, ns=(old_mtime, old_mtime))
    shutil.copy2(replacement, data)  # what cp -p does: the bytes, then the mtime
    assert (data.stat().st_size, mtime(data)) == (old_size, old_mtime)
    spec = load_spec(job)
    assert plan_job(spec).to_send == 1 and job_status(spec).pending == 1, "plan and status see the change too"
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    assert "up_to_date" not in result.output
    assert received(api) == 1
    out = pl.read_parquet(tmp_path.joinpath(*OUTPUT))
    assert out.get_column("text")[0] == edited.get_column("text")[0]
    assert "up_to_date" in cli("run", str(job)).output


def test_the_summary_and_manifest_say_what_the_run_did_to_the_output(tmp_path: Path, api: LocalAPI) -> None:
    frame = reviews(300)
    job = write_job(tmp_path, api, frame)
    first = cli("run", str(job))
    assert first.exit_code == 0, first.output
    said = fields(first, "summary")
    assert (said["output_action"], said["from_ledger"], said["requests_sent"]) == ("rebuilt", "0", "300")
    api.reset()

    _edit(frame, 150, "one edited review").write_csv(tmp_path / "input.csv")
    patched = cli("run", str(job))
    assert patched.exit_code == 0, patched.output
    said = fields(patched, "summary")
    # 299 rows' answers were reused from the output (their cells copied), one row was sent.
    assert (said["output_action"], said["from_ledger"], said["requests_sent"]) == ("patched", "299", "1")
    assert received(api) == 1
    recorded = manifest(tmp_path)
    assert (recorded["output_action"], recorded["rows_from_ledger"], recorded["requests_sent"]) == ("patched", 299, 1)

    again = cli("run", str(job))
    said = fields(again, "up_to_date")
    assert (said["output_action"], said["from_ledger"], said["requests_sent"]) == ("up_to_date", "300", "0")
    assert manifest(tmp_path) == recorded, "an up-to-date run writes nothing, its manifest included"

    frame.head(250).write_csv(tmp_path / "input.csv")  # rows removed: the output is rebuilt
    rebuilt = cli("run", str(job))
    said = fields(rebuilt, "summary")
    assert (said["output_action"], said["from_ledger"], said["requests_sent"]) == ("rebuilt", "250", "0")
    assert manifest(tmp_path)["output_action"] == "rebuilt"


def test_one_changed_row_is_the_only_request_sent(tmp_path: Path, api: LocalAPI) -> None:
    job = first_run(tmp_path, api)
    frame = reviews(30).with_columns(
        pl.when(pl.col("review_id") == "r-00007").then(pl.lit("changed text")).otherwise(pl.col("text")).alias("text")
    )
    frame.write_csv(tmp_path / "input.csv")
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    assert "up_to_date" not in result.output
    assert received(api) == 1
    out = pl.read_parquet(tmp_path.joinpath(*OUTPUT))
    assert out.filter(pl.col("review_id") == "r-00007").get_column("text").to_list() == ["changed text"]
    assert "up_to_date" in cli("run", str(job)).output  # and now it is up to date again


def test_a_changed_job_is_not_up_to_date_but_a_changed_pace_is(tmp_path: Path, api: LocalAPI) -> None:
    job = first_run(tmp_path, api)
    text = job.read_text()
    job.write_text(text.replace("concurrency = 16", "concurrency = 8\nrpm = 100000"))
    assert "up_to_date" in cli("run", str(job)).output, "limits change the pace, not the output"
    job.write_text(text.replace("Label the review", "Classify the review"))
    result = cli("run", str(job))
    assert result.exit_code == 0 and "up_to_date" not in result.output
    assert received(api) == 30  # a new system prompt is a new request for every row


def test_a_ledger_changed_by_another_run_rebuilds_the_output(tmp_path: Path, api: LocalAPI) -> None:
    ledger = tmp_path / "shared.ledger.sqlite"
    job = first_run(tmp_path / "a", api, job={"ledger": str(ledger)})
    other = write_job(tmp_path / "b", api, reviews(5, start=100), job={"ledger": str(ledger)})
    assert cli("run", str(other)).exit_code == 0
    api.reset()
    output = tmp_path.joinpath("a", *OUTPUT)
    before = mtime(output)
    result = cli("run", str(job))
    assert result.exit_code == 0 and "up_to_date" not in result.output
    assert received(api) == 0, "nothing to send: the rows' answers are in the ledger"
    assert mtime(output) != before, "rebuilt from the ledger as it is now"
    assert "up_to_date" in cli("run", str(job)).output


def test_a_deleted_or_edited_output_is_rebuilt(tmp_path: Path, api: LocalAPI) -> None:
    job = first_run(tmp_path, api)
    output = tmp_path.joinpath(*OUTPUT)
    expected = pl.read_parquet(output)
    output.unlink()
    result = cli("run", str(job))
    assert result.exit_code == 0 and "up_to_date" not in result.output
    assert received(api) == 0
    assert pl.read_parquet(output).drop("latency_ms").equals(expected.drop("latency_ms"))
    pl.read_parquet(output).head(3).write_parquet(output)  # someone overwrote it
    assert "up_to_date" not in cli("run", str(job)).output
    assert pl.read_parquet(output).height == 30


def test_fresh_and_retry_errors_bypass_the_shortcut(tmp_path: Path, api: LocalAPI) -> None:
    frame = reviews(10).with_columns(
        pl.when(pl.int_range(pl.len()) < 2).then(pl.lit("[[status:400]] bad")).otherwise("text").alias("text")
    )
    job = write_job(tmp_path, api, frame)
    assert cli("run", str(job)).exit_code == ExitCode.ROWS_FAILED
    api.reset()
    again = cli("run", str(job))
    assert "up_to_date" in again.output and again.exit_code == ExitCode.ROWS_FAILED, "same exit as the full rerun"
    assert received(api) == 0
    retried = cli("run", str(job), "--retry-errors")
    assert "up_to_date" not in retried.output
    assert received(api) == 2, "--retry-errors re-sends the two final errors"
    api.reset()
    fresh = cli("run", str(job), "--fresh", "--yes")
    assert "up_to_date" not in fresh.output
    assert received(api) == 10


def test_a_run_that_left_work_is_never_up_to_date(tmp_path: Path, api: LocalAPI) -> None:
    frame = reviews(6).with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("[[status:503]] down")).otherwise("text").alias("text")
    )
    job = write_job(tmp_path, api, frame, limits={"max_attempts": 1})
    assert cli("run", str(job)).exit_code == ExitCode.ROWS_FAILED
    assert manifest(tmp_path)["built_from"] is None, "a 503 is sent again by the next run"
    api.reset()
    result = cli("run", str(job))
    assert "up_to_date" not in result.output
    assert received(api) == 1


def test_status_and_plan_from_an_up_to_date_output_equal_the_full_count(tmp_path: Path, api: LocalAPI) -> None:
    # Repeated rows (usage paid once), a final error and an empty row: every count the full pass makes.
    base = pl.concat([reviews(120), reviews(120)]).with_columns(review_id=pl.format("id-{}", pl.int_range(pl.len())))
    frame = base.with_columns(
        pl.when(pl.int_range(pl.len()) == 3)
        .then(pl.lit("[[status:400]] bad"))
        .when(pl.int_range(pl.len()) == 5)
        .then(None)
        .otherwise(pl.col("text"))
        .alias("text")
    )
    job = write_job(tmp_path, api, frame, job={"chunk_rows": 100}, prompt={"user": "Review: {text}"})
    cli("run", str(job))
    spec = load_spec(job)
    manifest_path = spec.manifest_path
    fast_status, fast_plan = job_status(spec), plan_job(spec)
    shutil.move(manifest_path, tmp_path / "aside.json")  # without the record, both count the input
    slow_status, slow_plan = job_status(spec), plan_job(spec)
    shutil.move(tmp_path / "aside.json", manifest_path)
    assert fast_status.usd_spent == slow_status.usd_spent or abs(fast_status.usd_spent - slow_status.usd_spent) < 1e-9
    fast_status.usd_spent = slow_status.usd_spent
    fast_status.last_run = slow_status.last_run
    assert fast_status == slow_status
    assert (fast_status.ok, fast_status.failed_by_status) == (238, {"error": 1, "skipped": 1})
    assert fast_status.prompt_tokens == api.stats()["prompt_tokens"]
    assert fast_plan == slow_plan
    assert (fast_plan.answered, fast_plan.skipped, fast_plan.to_send) == (239, 1, 0)
    assert received(api) == 121  # 118 texts, the 400 row, and the copies of the two rows edited in the first half


def test_plan_counts_duplicates_across_chunks_without_a_set(tmp_path: Path, api: LocalAPI) -> None:
    frame = pl.concat([reviews(150), reviews(150), reviews(60)]).with_columns(
        review_id=pl.format("id-{}", pl.int_range(pl.len()))
    )
    job = write_job(tmp_path, api, frame, job={"chunk_rows": 100}, prompt={"user": "Review: {text}"})
    plan = plan_job(load_spec(job))
    assert (plan.rows, plan.to_send, plan.duplicates) == (360, 150, 210)
    job.write_text(job.read_text().replace("[job]\n", "[job]\ndedupe = false\n"))
    no_dedupe = plan_job(load_spec(job))
    assert (no_dedupe.to_send, no_dedupe.duplicates) == (360, 0)


def test_seen_hashes_reports_only_new_ones() -> None:
    seen = SeenHashes()
    try:
        assert seen.add_new(["aa", "bb", "aa"]) == {"aa", "bb"}
        assert seen.add_new(["bb", "cc"]) == {"cc"}
        assert seen.add_new([]) == set()
    finally:
        seen.close()


def test_ledger_generation_counts_every_change_to_answers(tmp_path: Path, api: LocalAPI) -> None:
    job = first_run(tmp_path, api, reviews(7))
    spec = load_spec(job)
    ledger = Ledger(spec.ledger_path, spec.endpoint_key)
    try:
        ledger_id, generation = ledger.state()
        assert generation == 7
        ledger.db.execute(
            "UPDATE answers SET content = 'x' WHERE request_hash IN (SELECT request_hash FROM answers LIMIT 2)"
        )
        assert ledger.state() == (ledger_id, 9)
        ledger.db.execute("DELETE FROM answers WHERE request_hash IN (SELECT request_hash FROM answers LIMIT 1)")
        assert ledger.state() == (ledger_id, 10)
    finally:
        ledger.close()
    other = Ledger(tmp_path / "other.sqlite", spec.endpoint_key)
    try:
        assert other.state()[0] != ledger_id, "a new ledger file is another ledger, even at generation 0"
    finally:
        other.close()


def _parquet_job(
    tmp_path: Path, api: LocalAPI, frame: pl.DataFrame, row_group_size: int | None = None, **sections: Any
) -> Path:
    """A job over a Parquet input (the row-group path of an incremental run)."""
    job = write_job(tmp_path, api, frame, **sections)
    frame.write_parquet(tmp_path / "input.parquet", row_group_size=row_group_size)
    job.write_text(job.read_text().replace("input.csv", "input.parquet"))
    return job


def _rebuilt(tmp_path: Path, job: Path) -> pl.DataFrame:
    """The output a run builds from nothing but the input and the ledger (no earlier output)."""
    output = tmp_path.joinpath(*OUTPUT)
    patched = pl.read_parquet(output)
    output.unlink()
    assert cli("run", str(job)).exit_code == 0
    rebuilt = pl.read_parquet(output)
    assert rebuilt.schema == patched.schema
    return rebuilt


def _watch(monkeypatch: Any) -> list[frozenset[int] | None]:
    """Record what each run's incremental pass decided (the real function runs)."""
    from pipeline.state import incremental

    seen: list[frozenset[int] | None] = []
    real = incremental.changed_rows

    def spy(p: Any) -> frozenset[int] | None:
        seen.append(real(p))
        return seen[-1]

    monkeypatch.setattr(incremental, "changed_rows", spy)
    return seen


def _edit(frame: pl.DataFrame, row: int, text: str) -> pl.DataFrame:
    return frame.with_columns(
        pl.when(pl.int_range(pl.len()) == row).then(pl.lit(text)).otherwise(pl.col("text")).alias("text")
    )


def test_an_incremental_run_patches_only_the_changed_rows_and_equals_a_rebuild(
    tmp_path: Path, api: LocalAPI, monkeypatch: Any
) -> None:
    seen = _watch(monkeypatch)
    frame = pl.concat([reviews(150), reviews(100)]).with_columns(review_id=pl.format("id-{}", pl.int_range(pl.len())))
    frame = _edit(frame, 7, None)  # type: ignore[arg-type]  # an empty row: skipped, and stays so
    job = _parquet_job(tmp_path, api, frame, prompt={"user": "Review: {text}"}, job={"chunk_rows": 100})
    assert cli("run", str(job)).exit_code == 0
    api.reset()
    changed = _edit(frame, 120, "a new text for row 120").vstack(
        pl.DataFrame({"review_id": ["id-250"], "product": ["kettle"], "stars": [3], "text": ["an appended row"]}),
    )
    changed.write_parquet(tmp_path / "input.parquet")
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    assert seen[-1] == frozenset({120, 250})  # row 120 is not shared: it and the new row are patched in
    assert received(api) == 2
    patched = pl.read_parquet(tmp_path.joinpath(*OUTPUT))
    assert patched.height == 251
    assert patched.get_column("text")[120] == "a new text for row 120"
    assert "up_to_date" in cli("run", str(job)).output
    assert patched.equals(_rebuilt(tmp_path, job))
    assert received(api) == 2, "the rebuild sent nothing"


def _doubled(n: int) -> pl.DataFrame:
    """``reviews(n)`` twice, with distinct ids: row ``i`` and row ``n + i`` ask the same request."""
    return pl.concat([reviews(n), reviews(n)]).with_columns(review_id=pl.format("id-{}", pl.int_range(pl.len())))


def _patched_then_rebuilt(
    tmp_path: Path,
    api: LocalAPI,
    job: Path,
    edited: pl.DataFrame,
    seen: list[frozenset[int] | None],
    row_group_size: int | None = None,
) -> tuple[pl.DataFrame, int]:
    """Write ``edited`` as the input, rerun (an incremental run), and check the patched output equals
    (every column, every row, in order) what a run builds from the input and the ledger alone.
    Returns the patched output and the requests the patch sent."""
    edited.write_parquet(tmp_path / "input.parquet", row_group_size=row_group_size)
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    assert seen[-1] is not None, "patched, not rebuilt"
    sent = received(api)
    patched = pl.read_parquet(tmp_path.joinpath(*OUTPUT))
    assert "up_to_date" in cli("run", str(job)).output
    assert patched.equals(_rebuilt(tmp_path, job))
    assert received(api) == sent, "the rebuild sent nothing"
    return patched, sent


def test_a_changed_first_asker_is_patched_with_its_request_s_other_rows(
    tmp_path: Path, api: LocalAPI, monkeypatch: Any
) -> None:
    seen = _watch(monkeypatch)
    frame = _doubled(120)
    job = _parquet_job(tmp_path, api, frame, prompt={"user": "Review: {text}"}, job={"chunk_rows": 100})
    assert cli("run", str(job)).exit_code == 0
    api.reset()
    # Row 5 paid for its request; row 125 reused it at zero usage. Once row 5 changes, row 125 is the
    # first (and only) row asking it: it is redone with row 5, from the ledger, and now carries the usage.
    out, sent = _patched_then_rebuilt(tmp_path, api, job, _edit(frame, 5, "row 5 now says something else"), seen)
    assert seen[-1] == frozenset({5, 125})
    assert sent == 1, "row 5's new request only; row 125's answer is the ledger's"
    assert out.get_column("prompt_tokens")[125] > 0
    assert out.get_column("attempts")[125] == 1
    assert out.get_column("prompt_tokens").sum() == api.stats()["prompt_tokens"] + _paid_before(out, 5)


def test_a_changed_row_asking_another_row_s_request_is_patched_exactly(
    tmp_path: Path, api: LocalAPI, monkeypatch: Any
) -> None:
    seen = _watch(monkeypatch)
    frame = _doubled(60)
    job = _parquet_job(tmp_path, api, frame, prompt={"user": "Review: {text}"}, job={"chunk_rows": 100})
    assert cli("run", str(job)).exit_code == 0
    api.reset()
    texts = frame.get_column("text")
    # Row 3 now asks row 40's request (so row 3, earlier, takes its usage from row 40), row 50 asks row
    # 20's (an earlier row's: row 50 carries none); row 63 and row 110 asked rows 3's and 50's old requests.
    edited = _edit(_edit(frame, 3, texts[40]), 50, texts[20])
    before = pl.read_parquet(tmp_path.joinpath(*OUTPUT))
    out, sent = _patched_then_rebuilt(tmp_path, api, job, edited, seen)
    assert seen[-1] == frozenset({3, 40, 100, 20, 80, 50, 63, 110})
    assert sent == 0, "every request redone is answered in the ledger"
    tokens = out.get_column("prompt_tokens")
    assert tokens[3] > 0 and tokens[40] == 0 and tokens[100] == 0
    assert tokens[50] == 0 and tokens[20] > 0
    assert tokens[63] > 0 and tokens[110] > 0, "the first rows left asking rows 3's and 50's old requests"
    assert tokens.sum() == before.get_column("prompt_tokens").sum(), "the same requests, paid once each"


def test_one_changed_row_of_a_tiled_input_sends_one_request_and_patches_its_copies(
    tmp_path: Path, api: LocalAPI, monkeypatch: Any
) -> None:
    from pipeline.state import incremental

    seen = _watch(monkeypatch)
    monkeypatch.setattr(incremental, "PATCH_CHUNK_ROWS", 64)  # the patch crosses many chunks
    tile = reviews(40)
    # Every request asked by 10 rows, review ids included (as the 10M benchmark); each row has its own row_id.
    frame = pl.concat([tile] * 10).with_columns(row_id=pl.format("row-{}", pl.int_range(pl.len())))
    # Row groups of 30 rows: the input is read across them in chunks of 64, as the output is.
    job = _parquet_job(
        tmp_path,
        api,
        frame,
        30,
        prompt={"user": "Review {review_id}: {text}"},
        job={"chunk_rows": 100, "id_column": "row_id"},
    )
    assert cli("run", str(job)).exit_code == 0
    assert received(api) == 40
    api.reset()
    _, sent = _patched_then_rebuilt(tmp_path, api, job, _edit(frame, 200, "row 200 was edited"), seen, 30)
    assert seen[-1] == frozenset(range(0, 400, 40))
    assert sent == 1


def test_a_change_to_a_request_asked_by_too_many_rows_rebuilds_the_output(
    tmp_path: Path, api: LocalAPI, monkeypatch: Any
) -> None:
    seen = _watch(monkeypatch)
    frame = pl.concat([reviews(1), reviews(1100)]).with_columns(
        text=pl.when(pl.int_range(pl.len()) < 1050).then(pl.lit("the same text")).otherwise(pl.col("text")),
        review_id=pl.format("id-{}", pl.int_range(pl.len())),
    )
    job = _parquet_job(tmp_path, api, frame, prompt={"user": "Review: {text}"}, job={"chunk_rows": 500})
    assert cli("run", str(job)).exit_code == 0
    api.reset()
    # Row 0 asked the request 1,050 rows ask: more rows to redo than the limit (1,000): rebuilt, still exact.
    _edit(frame, 0, "row 0 now differs").write_parquet(tmp_path / "input.parquet")
    assert cli("run", str(job)).exit_code == 0
    assert seen[-1] is None
    assert received(api) == 1
    out = pl.read_parquet(tmp_path.joinpath(*OUTPUT))
    assert out.get_column("prompt_tokens")[1] > 0 and out.get_column("prompt_tokens")[2] == 0
    assert out.equals(_rebuilt(tmp_path, job))


def _paid_before(out: pl.DataFrame, row: int) -> int:
    """Prompt tokens of every row but ``row`` (paid by the first run)."""
    return int(out.get_column("prompt_tokens").sum()) - int(out.get_column("prompt_tokens")[row])


def test_removed_rows_rebuild_the_output(tmp_path: Path, api: LocalAPI, monkeypatch: Any) -> None:
    seen = _watch(monkeypatch)
    frame = reviews(50)
    job = _parquet_job(tmp_path, api, frame)
    assert cli("run", str(job)).exit_code == 0
    api.reset()
    frame.head(40).write_parquet(tmp_path / "input.parquet")
    assert cli("run", str(job)).exit_code == 0
    assert seen[-1] is None
    assert received(api) == 0
    assert pl.read_parquet(tmp_path.joinpath(*OUTPUT)).height == 40


def test_retries_that_ended_ok_leave_a_complete_output() -> None:
    from pipeline.state.uptodate import complete

    # Every failed attempt is counted, also those a retry then answered: no row left to send by itself.
    assert complete({"ok": 10}, {"http_429": 3, "connection": 1}, stopped=False)
    assert not complete({"ok": 9, "error": 1}, {"timeout": 2}, stopped=False)  # a row a rerun sends again
    assert complete({"ok": 9, "error": 1}, {"http_400": 1}, stopped=False)  # final: waits for --retry-errors
    assert not complete({"ok": 9, "pending": 1}, {}, stopped=False)
    assert not complete({"ok": 10}, {}, stopped=True)


def test_a_run_that_retried_its_way_to_every_row_ok_is_up_to_date(tmp_path: Path, api: LocalAPI) -> None:
    from pipeline.localapi import ServerConfig

    api.config = ServerConfig(fail_5xx_rate=0.2, seed=5)
    api.reset()
    job = first_run(tmp_path, api, limits={"backoff_max_s": 0.2})
    assert manifest(tmp_path)["errors_by_kind"], "no request failed on the way: the test proves nothing"
    api.config = ServerConfig()
    result = cli("run", str(job))
    assert result.output.strip().startswith("seedbatch up_to_date:"), result.output
    assert received(api) == 0
