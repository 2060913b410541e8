"""``~`` in every path a user writes: job-file settings, path flags, and the commands' path arguments."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.localapi import LocalAPI
from pipeline.records import ExitCode
from tests.helpers import reviews

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string"}},
    "required": ["label"],
    "additionalProperties": False,
}


def test_tilde_is_the_home_folder_in_job_settings_and_flags(
    tmp_path: Path, api: LocalAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    (home / "schemas").mkdir()
    reviews(5).write_csv(home / "data" / "in.csv")
    reviews(3, start=100).write_csv(home / "data" / "other.csv")
    (home / "schemas" / "answer.json").write_text(json.dumps(SCHEMA))
    (home / "key.txt").write_text("sk-local\n")
    jobs = tmp_path / "elsewhere" / "jobs"
    jobs.mkdir(parents=True)
    job = jobs / "x.toml"
    job.write_text(
        "[job]\n"
        'input = "~/data/in.csv"\n'
        'output = "~/out/result.parquet"\n'
        'ledger = "~/ledgers/x.sqlite"\n'
        'batch_output = "~/out/batch.jsonl"\n'
        'run_output = "~/runs/{date}.parquet"\n'
        'id_column = "review_id"\n'
        "[prompt]\n"
        'user = "{text}"\n'
        "[output]\n"
        'format = "json_schema"\n'
        'schema = "~/schemas/answer.json"\n'
        "[endpoint]\n"
        'preset = "local"\n'
        f'base_url = "{api.base_url}"\n'
        'api_key_file = "~/key.txt"\n'
    )
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(main, ["run", str(job), "--no-progress"])
    assert result.exit_code == ExitCode.OK, result.output
    assert pl.read_parquet(home / "out" / "result.parquet").height == 5
    assert (home / "ledgers" / "x.sqlite").exists()
    assert (home / "out" / "batch.jsonl").exists()
    assert len(list((home / "runs").glob("*.parquet"))) == 1
    assert not any(p.name == "~" for p in tmp_path.rglob("~"))  # no folder named "~" anywhere

    # Flags and the job argument itself.
    result = CliRunner().invoke(
        main,
        ["run", "~/../elsewhere/jobs/x.toml", "--input", "~/data/other.csv", "--output", "~/out/o.parquet"],
    )
    assert result.exit_code == ExitCode.OK, result.output
    assert pl.read_parquet(home / "out" / "o.parquet").get_column("review_id").to_list()[0] == "r-00100"
    shown = CliRunner().invoke(main, ["show", "~/out/o.parquet", "--rows", "1"])
    assert shown.exit_code == 0, shown.output
    assert "r-00100" in shown.output
    made = CliRunner().invoke(main, ["init", "~/data/in.csv", "--job", "~/jobs/new.toml"])
    assert made.exit_code == 0, made.output
    assert (home / "jobs" / "new.toml").exists()
    planned = CliRunner().invoke(main, ["plan", "~/jobs/new.toml", "--endpoint", "local"])
    assert planned.exit_code == 0, planned.output
    assert not any(p.name == "~" for p in tmp_path.rglob("~"))
