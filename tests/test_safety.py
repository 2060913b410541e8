"""Safe on day one: nothing paid is lost, nothing fake passes as real, nothing is sent that cannot succeed.

One test per failure a new user met with ordinary mistakes and messy data, at the level they met it:
the CLI or ``run_job``, real files, the local API over loopback.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import polars as pl
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.job.spec import LOCAL_ENDPOINT, load_spec
from pipeline.localapi import LocalAPI, ServerConfig
from pipeline.planning import plan_job
from pipeline.runner import ExitCode, RunOptions, run_job
from pipeline.state.ledger import Ledger
from tests.helpers import ROOT, make_spec, reviews, run, to_toml, write_job


def _cli(args: list[str], cwd: Path | None = None, stdin: int | None = subprocess.DEVNULL) -> tuple[int, str, str]:
    """A real ``seedbatch`` process, as cron would start it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=env,
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


# ---------------------------------------------------------------- 1. read everything before paying


def test_malformed_csv_line_near_the_end_stops_before_any_request(tmp_path: Path, api: LocalAPI) -> None:
    job = write_job(tmp_path, api, reviews(5000))
    lines = (tmp_path / "input.csv").read_text().splitlines()
    lines[4000] += ",an extra field"  # the data row 4,000 (0-based 3,999) sits on line 4,001
    (tmp_path / "input.csv").write_text("\n".join(lines) + "\n")
    code, _, err = _cli(["run", str(job), "--no-progress"])
    assert code == ExitCode.BAD_INPUT, err
    assert len(err.strip().splitlines()) == 1, err
    assert "input.csv" in err
    assert api.stats()["received"] == 0, "nothing may be paid for before the whole input has parsed"


def test_manifest_and_status_carry_the_true_exit_code_of_a_failed_run(tmp_path: Path, api: LocalAPI) -> None:
    """The input breaks after sending began: answers stay in the ledger, manifest and status say exit 2."""
    spec = make_spec(tmp_path, api, n=40)

    def corrupt(summary: object, in_flight: int) -> None:
        spec.job.input.write_text('review_id,text\n"unterminated\n')

    api.config = ServerConfig(latency_ms=600)  # the first progress tick (0.2 s) comes while answers are due
    with pytest.raises(Exception) as caught:
        run_job(spec, RunOptions(progress=corrupt, progress_interval_s=0.0))
    assert getattr(caught.value, "exit_code", None) == ExitCode.BAD_INPUT
    manifest = json.loads(spec.manifest_path.read_text())
    assert manifest["exit_code"] == ExitCode.BAD_INPUT
    ledger = Ledger(spec.ledger_path, spec.endpoint_key)
    last = ledger.last_run()
    paid = ledger.db.execute("SELECT count(*) FROM answers").fetchone()[0]
    ledger.close()
    assert last is not None and last[3] == ExitCode.BAD_INPUT
    assert paid == api.stats()["answered_ok"] > 0, "every answer paid before the failure is in the ledger"


# ---------------------------------------------------------------- 2-3. answers keyed by where they came from


def test_local_answers_are_never_served_as_a_real_servers(tmp_path: Path, api: LocalAPI) -> None:
    job = write_job(tmp_path, None, reviews(8), endpoint={"preset": "vllm", "base_url": api.base_url})
    result = CliRunner().invoke(main, ["run", str(job), "--endpoint", "local", "--limit", "5", "--no-progress"])
    assert result.exit_code == ExitCode.OK, result.output
    assert api.stats()["received"] == 0, "--endpoint local is the built-in server, not the job's"
    result = CliRunner().invoke(main, ["run", str(job), "--limit", "5", "--no-progress"])
    assert result.exit_code == ExitCode.OK, result.output
    assert api.stats()["answered_ok"] == 5, "the real server answers the 5 rows the local API answered"
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out.get_column("status").to_list() == ["ok"] * 5


def test_endpoint_local_never_reaches_the_jobs_paid_server(tmp_path: Path) -> None:
    paid = LocalAPI(ServerConfig(require_key="sk-paid"))
    paid.start()
    try:
        job = write_job(tmp_path, None, reviews(6), endpoint={"preset": "openai", "base_url": paid.base_url})
        env_key = {"OPENAI_API_KEY": "sk-paid"}
        result = CliRunner(env=env_key).invoke(main, ["run", str(job), "--endpoint", "local", "--no-progress"])
        assert result.exit_code == ExitCode.OK, result.output
        assert paid.stats()["received"] == 0
        assert pl.read_parquet(tmp_path / "out" / "result.parquet").get_column("status").to_list() == ["ok"] * 6
    finally:
        paid.stop()


def test_old_ledger_is_migrated_local_answers_stay_local(tmp_path: Path, api: LocalAPI) -> None:
    """A ledger from before endpoint keys: its local API answers stay local, the rest go to the job's endpoint."""
    spec = make_spec(tmp_path, api, n=4)
    run(spec)
    db = Ledger(spec.ledger_path, spec.endpoint_key).db
    db.executescript(
        "CREATE TABLE old AS SELECT * FROM answers; DROP TABLE answers; ALTER TABLE old DROP COLUMN endpoint;"
        "ALTER TABLE old RENAME TO answers;"
    )
    first = db.execute("SELECT request_hash FROM answers ORDER BY request_hash LIMIT 1").fetchone()[0]
    db.execute("UPDATE answers SET model = 'some-real-model' WHERE request_hash = ?", (first,))
    db.close()
    api.reset()
    again = run(spec)
    assert api.stats()["received"] == 3, "only the answer not from the local API counts as this endpoint's"
    assert again.rows_from_ledger == 1
    ledger = Ledger(spec.ledger_path, LOCAL_ENDPOINT)
    assert len(ledger.known([h for (h,) in ledger.db.execute("SELECT request_hash FROM answers")])) == 3
    ledger.close()


def test_local_preset_refuses_a_base_url_off_this_machine(tmp_path: Path) -> None:
    job = write_job(tmp_path, None, reviews(2), endpoint={"preset": "local", "base_url": "https://api.aimlapi.com/v1"})
    code, _, err = _cli(["run", str(job)])
    assert code == ExitCode.BAD_INPUT
    assert "loopback" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- 4. output is not the input


@pytest.mark.parametrize("key", ["output", "ledger"])
def test_output_or_ledger_equal_to_the_input_is_refused(tmp_path: Path, api: LocalAPI, key: str) -> None:
    job = write_job(tmp_path, api, reviews(3))
    before = (tmp_path / "input.csv").read_bytes()
    code, _, err = _cli(["run", str(job), "--no-progress", *(["--output", "input.csv"] if key == "output" else [])],
                        cwd=tmp_path) if key == "output" else (None, None, None)  # fmt: skip
    if key == "ledger":
        text = (tmp_path / "job.toml").read_text().replace("[job]\n", '[job]\nledger = "input.csv"\n')
        (tmp_path / "job.toml").write_text(text)
        code, _, err = _cli(["run", str(job), "--no-progress"])
    assert code == ExitCode.BAD_INPUT, err
    assert "input" in (err or "") and len((err or "").strip().splitlines()) == 1
    assert (tmp_path / "input.csv").read_bytes() == before
    assert api.stats()["received"] == 0


# ---------------------------------------------------------------- 5. context guard, empty rows


def test_rows_over_the_context_and_empty_rows_are_never_sent(tmp_path: Path, api: LocalAPI) -> None:
    frame = reviews(6).with_columns(
        pl.when(pl.col("review_id") == "r-00001").then(pl.lit("x" * 1_400_000)).otherwise(pl.col("text")).alias("text"),
    )
    frame = frame.with_columns(
        [
            pl.when(pl.col("review_id").is_in(["r-00002", "r-00003"])).then(None).otherwise(pl.col(c)).alias(c)
            for c in ("product", "stars", "text")
        ]
    )
    frame = frame.with_columns(
        pl.when(pl.col("review_id") == "r-00003").then(pl.lit("  ")).otherwise(pl.col("text")).alias("text")
    )
    spec = make_spec(tmp_path, api, frame, prompt={"system": "Label it."})
    plan = plan_job(spec)
    assert (plan.too_long, plan.skipped, plan.to_send) == (1, 2, 3)
    summary = run(spec)
    assert api.stats()["received"] == 3
    out = pl.read_parquet(spec.job.output)
    assert out.get_column("status").to_list() == ["ok", "too_long", "skipped", "skipped", "ok", "ok"]
    assert out.get_column("usd_spent").to_list()[1:4] == [None, None, None]
    assert "262,144" in out.get_column("error").to_list()[1]
    assert summary.exit_code == 1, "a too_long row is a failed row; skipped rows are not"
    # Changing the setting takes effect at once: the empty rows are sent now, not read from the ledger.
    api.reset()
    again = run(make_spec(tmp_path, api, frame, prompt={"system": "Label it.", "send_empty": True}))
    assert api.stats()["received"] == 2
    assert again.rows_by_status == {"ok": 5, "too_long": 1}


def test_context_tokens_setting_guards_a_self_hosted_model(tmp_path: Path, api: LocalAPI) -> None:
    spec = make_spec(tmp_path, api, n=3, model={"max_tokens": 64, "context_tokens": 80})
    summary = run(spec)
    assert summary.rows_by_status == {"too_long": 3}
    assert api.stats()["received"] == 0


# ---------------------------------------------------------------- 6. transient failures are not permanent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_rows_failed_by_an_outage_are_sent_by_the_next_run(tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1"
    job = write_job(
        tmp_path, None, reviews(5), endpoint={"preset": "vllm", "base_url": url}, limits={"max_attempts": 1}
    )
    code, _, err = _cli(["run", str(job), "--no-progress"])
    assert code == 1, err  # the server is down: every row is an error
    server = LocalAPI(ServerConfig(), port=port)
    server.start()
    try:
        code, _, err = _cli(["run", str(job), "--no-progress"])  # cron's next run, no flag
        assert code == ExitCode.OK, err
        assert server.stats()["answered_ok"] == 5
    finally:
        server.stop()


# ---------------------------------------------------------------- 7. user mistakes are exit 2, not 70


def test_unwritable_ledger_place_is_a_user_error(tmp_path: Path, api: LocalAPI) -> None:
    job = write_job(tmp_path, api, reviews(2), job={"ledger": "/proc/seedbatch-test/ledger.sqlite"})
    code, _, err = _cli(["run", str(job), "--no-progress"])
    assert code == ExitCode.BAD_INPUT, err
    assert len(err.strip().splitlines()) == 1 and "job.ledger" in err


def test_fresh_without_yes_off_a_terminal_is_a_user_error(tmp_path: Path, api: LocalAPI) -> None:
    job = write_job(tmp_path, api, reviews(2))
    code, _, err = _cli(["run", str(job), "--fresh"])
    assert code == ExitCode.BAD_INPUT, err
    assert "--yes" in err and len(err.strip().splitlines()) == 1
    assert api.stats()["received"] == 0


# ---------------------------------------------------------------- 8. paths beside the job file


def test_relative_paths_resolve_against_the_job_file_not_the_cwd(tmp_path: Path, api: LocalAPI) -> None:
    project = tmp_path / "project"
    (project / "jobs").mkdir(parents=True)
    (project / "data").mkdir()
    reviews(4).write_csv(project / "data" / "x.csv")
    data = {
        "job": {"input": "../data/x.csv", "output": "../out/x.parquet", "id_column": "review_id"},
        "prompt": {"user": "{text}"},
        "endpoint": {"preset": "local", "base_url": api.base_url},
    }
    (project / "jobs" / "x.toml").write_text(to_toml(data))
    code, _, err = _cli(["run", str(project / "jobs" / "x.toml"), "--no-progress"], cwd=Path("/"))
    assert code == ExitCode.OK, err
    assert pl.read_parquet(project / "out" / "x.parquet").height == 4
    # A flag is relative to where the command runs.
    code, _, err = _cli(["run", "jobs/x.toml", "--output", "elsewhere.parquet", "--no-progress"], cwd=project)
    assert code == ExitCode.OK, err
    assert (project / "elsewhere.parquet").exists()


# ---------------------------------------------------------------- 9. ok content is the document


def test_ok_structured_content_is_the_json_document_without_its_fence(tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": ["positive", "negative", "neutral"]}},
        "required": ["label"],
        "additionalProperties": False,
    }

    def answer(request: httpx.Request) -> httpx.Response:
        n = int(orjson.loads(request.content)["messages"][-1]["content"].split()[2].rstrip(":"))
        doc = '{"label": "positive"}'
        content = f"```json\n{doc}\n```" if n % 2 else doc
        return httpx.Response(200, json={"id": "x", "model": "m", "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
        ], "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}})  # fmt: skip

    spec = make_spec(
        tmp_path, None, n=10, output={"format": "json_schema", "schema": schema},
        endpoint={"preset": "vllm", "base_url": "http://127.0.0.1:9/v1"}, prompt={"user": "{text}"},
    )  # fmt: skip
    run_job(spec, RunOptions(transport=httpx.MockTransport(answer)))
    out = pl.read_parquet(spec.job.output)
    assert out.get_column("status").to_list() == ["ok"] * 10
    assert [json.loads(c) for c in out.get_column("content")] == [{"label": "positive"}] * 10


# ---------------------------------------------------------------- 11. smaller messages


def test_a_typo_is_named_even_when_a_required_key_is_also_missing(tmp_path: Path) -> None:
    path = tmp_path / "j.toml"
    path.write_text('[job]\ninput = "a.csv"\nouptut = "o.parquet"\n[prompt]\nuser = "{x}"\n')
    code, _, err = _cli(["run", str(path)])
    assert code == ExitCode.BAD_INPUT
    assert "job.ouptut: unknown key" in err and "job.output" in err and "README 'Jobs'" in err


def test_json_in_a_template_suggests_doubled_braces(tmp_path: Path, api: LocalAPI) -> None:
    job = write_job(tmp_path, api, reviews(2), prompt={"user": "{text}"})
    lines = [
        'user = \'Answer like {"label": "x"} for {text}\'' if line.startswith("user = ") else line
        for line in job.read_text().splitlines()
    ]
    job.write_text("\n".join(lines) + "\n")
    code, _, err = _cli(["run", str(job)])
    assert code == ExitCode.BAD_INPUT
    assert "{{" in err and len(err.strip().splitlines()) == 1


def test_show_says_when_no_row_has_the_status(tmp_path: Path, api: LocalAPI) -> None:
    spec = make_spec(tmp_path, api, n=3)
    run(spec)
    result = CliRunner().invoke(main, ["show", str(spec.job.output), "--status", "refused"])
    assert result.exit_code == 0
    assert "no rows with status 'refused'" in result.output and "ok=3" in result.output


def test_errors_are_json_when_the_log_format_is_json(tmp_path: Path) -> None:
    code, _, err = _cli(["run", str(tmp_path / "absent.toml"), "--log-format", "json"])
    assert code == ExitCode.BAD_INPUT
    event = json.loads(err.strip())
    assert event["event"] == "error" and event["exit_code"] == ExitCode.BAD_INPUT and "absent.toml" in event["message"]


def test_example_jobs_load_from_any_directory() -> None:
    cwd = Path.cwd()
    try:
        os.chdir("/")
        for job in sorted((ROOT / "jobs").glob("*.toml")):
            spec = load_spec(job)
            assert spec.job.input.exists() or "input" in spec.objects, job  # an s3:// input is fetched at run
    finally:
        os.chdir(cwd)
