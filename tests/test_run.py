"""The core run end to end: real HTTP to the local API on loopback, real Parquet, a real SQLite ledger."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.localapi import KNOWN_MODELS, LocalAPI, ServerConfig
from pipeline.runner import ExitCode
from pipeline.sending.client import FEW_REQUESTS
from pipeline.tables.writer import OUTPUT_COLUMNS
from tests.helpers import ROOT, example_job, make_spec, reviews, run, write_job


def test_demo_job_end_to_end(tmp_path: Path, api: LocalAPI) -> None:
    spec = example_job("demo.toml", tmp_path, api)
    summary = run(spec)
    assert summary.exit_code == ExitCode.OK
    source = pl.read_csv(ROOT / "data" / "reviews.csv")
    out = pl.read_parquet(spec.job.output)

    assert out.height == source.height
    assert out.get_column("review_id").to_list() == source.get_column("review_id").to_list()  # input order kept
    assert out.columns[: source.width] == source.columns
    assert dict(out.schema) == {**dict(source.schema), **OUTPUT_COLUMNS}
    assert out.get_column("status").unique().to_list() == ["ok"]
    assert out.get_column("content").null_count() == 0
    paid = out.filter(pl.col("attempts") > 0)
    assert (paid.get_column("prompt_tokens") > 0).all()
    # A row identical to an earlier one reuses its answer: zero attempts, zero cost of its own.
    reused = out.filter(pl.col("attempts") == 0)
    assert reused.height == summary.rows_deduplicated
    assert reused.get_column("usd_spent").sum() == 0

    billed = api.stats()
    # Identical rows are sent once; the output carries each paid answer's cost once.
    assert out.get_column("usd_spent").sum() == pytest.approx(billed["usd_spent"], rel=1e-9)
    assert out.get_column("prompt_tokens").sum() == billed["prompt_tokens"]
    assert out.get_column("completion_tokens").sum() == billed["completion_tokens"]
    assert summary.usd_spent == pytest.approx(billed["usd_spent"], rel=1e-9)
    assert summary.requests_sent == billed["answered_ok"]
    assert billed["duplicates"] == 0


def test_a_twin_in_a_later_chunk_is_deduplicated_not_from_the_ledger(tmp_path: Path, api: LocalAPI) -> None:
    """Row 299 asks what row 0 asked; its chunk is read after row 0's answer was committed by this run."""
    frame = reviews(300)
    twin = frame.slice(0, 1).with_columns(pl.lit("r-twin").alias("review_id"))
    frame = pl.concat([frame.slice(0, 299), twin])
    summary = run(make_spec(tmp_path, api, frame))
    assert (summary.rows_deduplicated, summary.rows_from_ledger) == (1, 0)
    assert api.stats()["answered_ok"] == 299


def test_null_cells_render_empty_and_are_counted(tmp_path: Path, api: LocalAPI) -> None:
    frame = reviews(10).with_columns(
        pl.when(pl.int_range(pl.len()) % 3 == 0).then(None).otherwise(pl.col("text")).alias("text")
    )
    summary = run(make_spec(tmp_path, api, frame))
    assert summary.null_cells == 4
    assert summary.exit_code == ExitCode.OK


@pytest.mark.parametrize("rows", [FEW_REQUESTS, 160], ids=["httpx-pool", "aiohttp-pool"])
def test_faults_every_row_ok_and_answered_once(tmp_path: Path, api: LocalAPI, rows: int) -> None:
    """Both connection pools (httpx's own for a job of few rows, aiohttp's above) meet the same faults."""
    api.config = ServerConfig(fail_5xx_rate=0.05, drop_rate=0.02, rpm=2400, burst_s=1.0, latency_ms=5, seed=7)
    # The job's RPM is 5× the server's: its opening burst meets the server's limit.
    limits = {"rpm": 12000, "concurrency": 32, "backoff_max_s": 1.0, "max_attempts": 10}
    spec = make_spec(tmp_path, api, n=rows, limits=limits)
    summary = run(spec)
    out = pl.read_parquet(spec.job.output)
    stats = api.stats()

    assert out.get_column("status").value_counts().rows() == [("ok", rows)]
    assert stats["answered_ok"] == rows
    assert sorted(set(stats["ok_by_body_hash"].values())) == [1]  # every request answered OK exactly once
    assert stats["rate_limited"] > 0, "the server-side limit was never reached: the test proves nothing"
    assert stats["by_status"].get("500", 0) + stats["by_status"].get(500, 0) + stats["dropped"] > 0
    assert summary.retries > 0
    assert (out.get_column("attempts") >= 1).all()
    # A dropped connection may or may not have been billed: counted, not hidden.
    assert out.get_column("unconfirmed_attempts").sum() >= 0


def test_bad_key_stops_at_once_and_never_prints_it(tmp_path: Path, api: LocalAPI) -> None:
    api.config = ServerConfig(require_key="right-key")
    secret = "sk-WRONG-KEY-1234567890"
    job = write_job(tmp_path, api, reviews(400))
    started = time.monotonic()
    result = CliRunner().invoke(main, ["run", str(job), "--no-progress"], env={"SEEDBATCH_LOCAL_KEY": secret})
    elapsed = time.monotonic() - started
    assert result.exit_code == ExitCode.FATAL_API, result.output
    assert elapsed < 1.0
    assert "SEEDBATCH_LOCAL_KEY" in result.output
    assert secret not in result.output
    assert api.stats()["by_status"] in ({401: api.stats()["received"]}, {"401": api.stats()["received"]})
    assert api.stats()["received"] <= 16  # at most the requests already in flight (concurrency 16), not 400


@pytest.mark.parametrize("concurrency", [4, None], ids=["4-wide", "default"])
def test_a_misspelled_model_stops_at_once_with_one_line_naming_it(
    tmp_path: Path, api: LocalAPI, concurrency: int | None
) -> None:
    limits = {"concurrency": concurrency} if concurrency else {}
    job = write_job(tmp_path, api, reviews(400), model={"name": "bytedance/dola-seed-2-0-litee"}, limits=limits)
    if concurrency is None:  # the job's default, not job_dict's 16
        job.write_text(job.read_text().replace("concurrency = 16\n", ""))
    command = [sys.executable, "-m", "pipeline", "run", str(job), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == ExitCode.FATAL_API, done.stderr
    named = [line for line in (done.stdout + done.stderr).splitlines() if "bytedance/dola-seed-2-0-litee" in line]
    assert len(named) == 1, done.stderr  # one line, no traceback per request in flight
    assert "model.name" in named[0] and "404" in named[0]
    assert api.stats()["by_status"] == {404: api.stats()["received"]}
    # The first 404 stops the run: the requests already in flight and nothing after, not 400. The opening
    # burst is the pacer's first in-flight cap: limits.concurrency, at most 32 before any answer.
    assert api.stats()["received"] <= (concurrency + 1 if concurrency else 33), api.stats()


def test_a_400_marks_only_its_row(tmp_path: Path, api: LocalAPI) -> None:
    frame = reviews(12).with_columns(
        pl.when(pl.col("review_id") == "r-00005")
        .then(pl.lit("[[status:400]] broken row"))
        .otherwise(pl.col("text"))
        .alias("text")
    )
    spec = make_spec(tmp_path, api, frame)
    summary = run(spec)
    out = pl.read_parquet(spec.job.output)
    bad = out.filter(pl.col("status") != "ok")
    assert bad.get_column("review_id").to_list() == ["r-00005"]
    assert bad.get_column("status").item() == "error"
    assert bad.get_column("attempts").item() == 1  # a 400 is not retried
    assert "400" in bad.get_column("error").item()
    assert summary.exit_code == ExitCode.ROWS_FAILED


def _cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("missing_input", "input file not found"),
        ("corrupt_parquet", "input.parquet"),
        ("empty_csv", "input.csv"),
        ("missing_column", "'colour'"),
        ("unknown_key", "job.colour"),
        ("missing_job", "job file not found"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_sent(tmp_path: Path, api: LocalAPI, case: str, expect: str) -> None:
    csv = tmp_path / "input.csv"
    reviews(5).write_csv(csv)
    input_line = f'input = "{csv}"'
    user = "{text}"
    extra = ""
    if case == "missing_input":
        input_line = f'input = "{tmp_path / "nope.csv"}"'
    elif case == "corrupt_parquet":
        bad = tmp_path / "input.parquet"
        bad.write_bytes(b"PAR1 this is not a parquet file")
        input_line = f'input = "{bad}"'
    elif case == "empty_csv":
        csv.write_text("")
    elif case == "missing_column":
        user = "{colour}: {text}"
    elif case == "unknown_key":
        extra = 'colour = "blue"'
    job = tmp_path / "job.toml"
    job.write_text(
        f"""[job]
{input_line}
output = "{tmp_path / "out.parquet"}"
{extra}
[prompt]
user = "{user}"
[endpoint]
preset = "local"
base_url = "{api.base_url}"
"""
    )
    code, output = _cli(["run", str(tmp_path / "absent.toml" if case == "missing_job" else job), "--no-progress"])
    assert code == ExitCode.BAD_INPUT, output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("seedbatch: error: ")
    assert expect in lines[0]
    assert "Traceback" not in output
    assert api.stats()["received"] == 0


def test_missing_key_fails_before_sending(tmp_path: Path, api: LocalAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIMLAPI_API_KEY", raising=False)
    job = write_job(tmp_path, api, reviews(3), endpoint={"preset": "aimlapi"})
    code, output = _cli(["run", str(job)])
    assert code == ExitCode.BAD_INPUT
    assert "AIMLAPI_API_KEY" in output
    assert api.stats()["received"] == 0


def test_cli_overrides_reach_the_request(tmp_path: Path, api: LocalAPI) -> None:
    api.config = ServerConfig(models=(*KNOWN_MODELS, "m-x"))  # the model --model names
    job = write_job(tmp_path, None, reviews(7))  # no base_url: --base-url must supply it
    other = tmp_path / "other.parquet"
    code, output = _cli(
        ["run", str(job), "--base-url", api.base_url, "--output", str(other), "--limit", "3", "--model", "m-x",
         "--concurrency", "2", "--rpm", "6000", "--no-progress"]
    )  # fmt: skip
    assert code == ExitCode.OK, output
    out = pl.read_parquet(other)
    assert out.height == 3
    assert api.stats()["answered_ok"] == 3
