"""Running it for real: progress lines, plan, budget, manifest, secrets, one-line config errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.job.spec import load_spec
from pipeline.localapi import KNOWN_MODELS, LocalAPI, ServerConfig
from pipeline.planning import plan_job
from pipeline.runner import ExitCode
from tests.helpers import ROOT, example_job, make_spec, reviews, run, write_job


def test_progress_is_a_json_line_when_not_a_terminal(tmp_path: Path, api: LocalAPI) -> None:
    api.config = ServerConfig(latency_ms=100)
    job = write_job(tmp_path, api, reviews(60), limits={"concurrency": 4})
    result = CliRunner().invoke(main, ["run", str(job), "--log-format", "json", "--progress-interval", "0.3"])
    assert result.exit_code == ExitCode.OK, result.output
    events = [json.loads(line) for line in result.output.strip().splitlines()]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress, "no progress line when stderr is not a terminal"
    assert "\x1b[" not in result.output  # no terminal animation
    assert {"job", "run_id", "rows_done", "rows_total", "in_flight", "requests_per_s", "tokens_per_s", "usd_spent",
            "retries", "errors_by_kind", "eta_s"} <= set(progress[0])  # fmt: skip
    summary = next(e for e in events if e["event"] == "summary")
    assert summary["rows_ok"] == 60
    assert summary["exit_code"] == ExitCode.OK


def test_errors_are_summarized_by_kind_not_one_line_per_row(tmp_path: Path, api: LocalAPI) -> None:
    frame = reviews(20).with_columns(
        pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.lit("[[status:400]] bad")).otherwise("text").alias("text")
    )  # every other row: a refusal that rows between them do not get is about those rows, not the setup
    job = write_job(tmp_path, api, frame)
    result = CliRunner().invoke(main, ["run", str(job), "--log-format", "json", "--no-progress"])
    assert result.exit_code == ExitCode.ROWS_FAILED
    errors = [json.loads(line) for line in result.output.splitlines() if '"event": "errors"' in line]
    assert len(errors) == 1
    assert errors[0]["count"] == 10
    assert "400" in errors[0]["example"]


@pytest.mark.parametrize("job", ["demo.toml", "label_reviews.toml", "extract_invoices.toml", "tool_extract.toml"])
def test_plan_estimates_input_tokens_within_15_percent(tmp_path: Path, api: LocalAPI, job: str) -> None:
    spec = example_job(job, tmp_path, api)
    plan = plan_job(spec)
    assert api.stats()["received"] == 0, "plan sends nothing"
    assert plan.to_send == plan.rows - plan.duplicates
    run(spec)
    reported = api.stats()["prompt_tokens"]
    error = plan.est_prompt_tokens / reported - 1
    print(f"\n{job}: plan estimated {plan.est_prompt_tokens} input tokens, server reported {reported} ({error:+.1%})")
    assert abs(error) <= 0.15
    again = plan_job(spec)
    assert again.to_send == 0
    assert again.answered == plan.rows  # identical rows count as answered too


def test_plan_command_prints_the_figures(tmp_path: Path, api: LocalAPI) -> None:
    job = write_job(tmp_path, api, reviews(50), limits={"rpm": 60})
    result = CliRunner().invoke(main, ["plan", str(job)])
    assert result.exit_code == 0, result.output
    for text in ("50 selected", "50 to send", "input tokens", "cost", "bound by rpm"):
        assert text in result.output
    assert api.stats()["received"] == 0


def test_budget_stops_before_overshoot_and_a_raised_budget_continues(tmp_path: Path, api: LocalAPI) -> None:
    budget = 0.002
    spec = make_spec(
        tmp_path, api, reviews(300), limits={"max_cost_usd": budget, "concurrency": 8},
        pricing={"input_per_million": 2.0, "output_per_million": 8.0},
    )  # fmt: skip
    api.config = ServerConfig(input_per_million=2.0, output_per_million=8.0, latency_ms=5)
    summary = run(spec)
    assert summary.exit_code == ExitCode.PARTIAL
    assert summary.stop_reason is not None
    assert "budget" in summary.stop_reason
    spent = api.stats()["usd_spent"]
    # Worst case of one request: its prompt estimate + max_tokens, at the job's prices.
    worst_one = (80 * 2.0 + 64 * 8.0) / 1e6
    assert spent <= budget + 8 * worst_one
    assert spent <= budget, f"spent {spent} of {budget}: reservations of in-flight worst cases keep it under"
    out = pl.read_parquet(spec.job.output)
    assert out.filter(pl.col("status") == "pending").height > 0
    print(f"\nbudget ${budget}: spent ${spent:.6f} at the server, {out.filter(pl.col('status') == 'ok').height} rows")

    raised = make_spec(
        tmp_path, api, reviews(300), limits={"max_cost_usd": 1.0, "concurrency": 8},
        pricing={"input_per_million": 2.0, "output_per_million": 8.0},
    )  # fmt: skip
    assert run(raised).exit_code == ExitCode.OK
    assert api.stats()["duplicates"] == 0


def test_manifest_has_what_a_monitor_reads(tmp_path: Path, api: LocalAPI) -> None:
    spec = make_spec(tmp_path, api, reviews(12))
    summary = run(spec)
    manifest = json.loads(spec.manifest_path.read_text())
    expected = {
        "job_file_sha256", "seedbatch_version", "started_at", "ended_at", "rows_by_status", "requests_sent",
        "retries", "prompt_tokens", "completion_tokens", "usd_spent", "http_429", "exit_code", "run_id",
    }  # fmt: skip
    assert expected <= set(manifest)
    assert manifest["rows_by_status"] == {"ok": 12}
    assert manifest["exit_code"] == ExitCode.OK
    assert manifest["requests_sent"] == 12
    assert manifest["usd_spent"] == pytest.approx(summary.usd_spent)


def _search(root: Path, secret: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_the_key_never_leaves_the_process(tmp_path: Path, api: LocalAPI) -> None:
    """Success, 401, 5xx and a crash with a recognisable key; search every file and byte of output."""
    secret = "sk-SEEDBATCH-CANARY-7f3a9c1e"
    key_file = tmp_path / "key.txt"
    key_file.write_text(secret + "\n")
    env = {**os.environ, "SEEDBATCH_LOCAL_KEY": secret}
    outputs: list[bytes] = []

    def go(job: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
        done = subprocess.run([sys.executable, "-m", "pipeline", "run", str(job), "--no-progress", *args],
                              env=env, capture_output=True, timeout=120, check=False)  # fmt: skip
        outputs.extend([done.stdout, done.stderr])
        return done

    api.config = ServerConfig(require_key=secret)
    ok_dir = tmp_path / "ok"
    ok_dir.mkdir()
    job = write_job(ok_dir, api, reviews(20))
    assert go(job, "--log-format", "json", "--log-level", "DEBUG").returncode == ExitCode.OK

    api.config = ServerConfig(require_key="another-key")
    bad_dir = tmp_path / "unauthorized"
    bad_dir.mkdir()
    assert go(write_job(bad_dir, api, reviews(20)), "--debug").returncode == ExitCode.FATAL_API

    api.config = ServerConfig(require_key=secret, fail_5xx_rate=1.0)
    flaky_dir = tmp_path / "flaky"
    flaky_dir.mkdir()
    down = write_job(flaky_dir, api, reviews(5), limits={"max_attempts": 2, "outage_wait_s": 0})
    assert go(down).returncode == ExitCode.UNAVAILABLE

    api.config = ServerConfig(require_key=secret, latency_ms=2000)
    crash_dir = tmp_path / "crash"
    crash_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(write_job(crash_dir, api, reviews(20)))],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 20
    while api.stats()["received"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    environ_visible_to_ps = secret.encode() in cmdline
    proc.send_signal(signal.SIGTERM)
    outputs.extend(proc.communicate(timeout=60))

    assert not environ_visible_to_ps
    files_with_key = _search(tmp_path, secret.encode())
    assert files_with_key == [str(key_file)], files_with_key
    assert not [o for o in outputs if secret.encode() in o]


HEAD = '[job]\ninput = "data/reviews.csv"\noutput = "out/x.parquet"\n'
PROMPT = '[prompt]\nuser = "{text}"\n'
LOCAL = '[endpoint]\npreset = "local"\n'
BAD_CONFIGS = [
    ("[job]\ninput = 3", "job.input"),
    (HEAD + PROMPT + "[model]\ntemperature = 9", "model.temperature"),
    (HEAD + PROMPT + "[limits]\nrpm = -1", "limits.rpm"),
    (HEAD + PROMPT + '[endpoint]\npreset = "x"', "endpoint.preset"),
    (HEAD.replace("x.parquet", "x.xlsx") + PROMPT + LOCAL, "unknown output format"),
    (HEAD + '[prompt]\nuser = "{text"\n' + LOCAL, "prompt.user"),
    (HEAD + PROMPT + '[output]\nformat = "json_schema"', "output.schema"),
    ("[job\n", "not valid TOML"),
    (HEAD + 'id_column = "nope"\n' + PROMPT + LOCAL, "'nope'"),
]


@pytest.mark.parametrize(("toml", "expect"), BAD_CONFIGS)
def test_bad_configuration_is_one_line_naming_the_field(tmp_path: Path, toml: str, expect: str) -> None:
    job = tmp_path / "job.toml"
    job.write_text(toml.replace('"data/', f'"{ROOT}/data/').replace('"out/', f'"{tmp_path}/out/'))
    result = CliRunner().invoke(main, ["run", str(job)])
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert str(job) in lines[0] or "job." in lines[0] or ".parquet" in lines[0]
    assert expect in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_show_prints_rows_readably(tmp_path: Path, api: LocalAPI) -> None:
    spec = make_spec(tmp_path, api, reviews(8))
    run(spec)
    result = CliRunner().invoke(main, ["show", str(spec.job.output), "--rows", "2"])
    assert result.exit_code == 0
    assert result.output.count("── row") == 2
    assert "r-00000" in result.output


def test_status_reads_the_ledger_without_sending(tmp_path: Path, api: LocalAPI) -> None:
    job = write_job(tmp_path, api, reviews(10))
    spec = load_spec(job)
    run(spec)
    before = api.stats()["received"]
    result = CliRunner().invoke(main, ["status", str(job)])
    assert result.exit_code == 0, result.output
    assert "10 total: 10 ok, 0 failed, 0 pending" in result.output
    assert api.stats()["received"] == before


def test_limit_and_sample_try_a_few_rows(tmp_path: Path, api: LocalAPI) -> None:
    job = write_job(tmp_path, api, reviews(100))
    result = CliRunner().invoke(main, ["run", str(job), "--sample", "7", "--sample-seed", "3", "--no-progress"])
    assert result.exit_code == ExitCode.OK, result.output
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out.height == 7
    ids = out.get_column("review_id").to_list()
    assert ids != [f"r-{i:05d}" for i in range(7)]  # random rows, not the first seven
    assert api.stats()["answered_ok"] == 7


def test_serve_model_adds_models_to_the_default_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.localapi

    served: list[ServerConfig] = []
    monkeypatch.setattr(pipeline.localapi, "run_server", lambda config, *a, **k: served.append(config), raising=False)
    result = CliRunner().invoke(main, ["serve", "--model", "gpt-4o-mini", "--model", "my/model"])
    assert result.exit_code == 0, result.output
    assert served[0].models == (*KNOWN_MODELS, "gpt-4o-mini", "my/model")


def test_serve_refuses_a_key_variable_that_is_not_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEEDBATCH_TEST_UNSET_KEY", raising=False)
    result = CliRunner().invoke(main, ["serve", "--require-key-env", "SEEDBATCH_TEST_UNSET_KEY"])
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "SEEDBATCH_TEST_UNSET_KEY" in result.output
