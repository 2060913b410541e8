"""``seedbatch init INPUT``: the starter job it writes loads, plans and runs; nothing is overwritten unasked."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner, Result

from pipeline.cli import main
from pipeline.localapi import LocalAPI
from tests.helpers import ROOT


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, [*args])


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding copies of the sample data, as the current directory."""
    (tmp_path / "data").mkdir()
    for name in ("reviews.csv", "batch_requests.jsonl", "conversations.parquet"):
        shutil.copy(ROOT / "data" / name, tmp_path / "data" / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("name", "kind", "key"),
    [
        ("reviews.csv", "template", ("prompt", "user")),
        ("batch_requests.jsonl", "openai_batch", ("job", "input_format")),
        ("conversations.parquet", "messages", ("prompt", "messages_column")),
    ],
)
def test_the_starter_job_plans_and_runs(
    project: Path, api: LocalAPI, name: str, kind: str, key: tuple[str, str]
) -> None:
    stem = Path(name).stem
    result = cli("init", f"data/{name}")
    assert result.exit_code == 0, result.output
    assert f"wrote jobs/{stem}.toml ({kind}:" in result.output
    job = project / "jobs" / f"{stem}.toml"
    data = tomllib.loads(job.read_text())
    assert data[key[0]][key[1]]
    assert data["job"]["input"] == f"../data/{name}"  # relative to the job file
    assert data["endpoint"]["preset"] == "aimlapi"

    planned = cli("plan", str(job), "--endpoint", "local")
    assert planned.exit_code == 0, planned.output
    assert "to send" in planned.output
    ran = cli("run", str(job), "--base-url", api.base_url, "--endpoint", "local", "--limit", "5", "--no-progress")
    assert ran.exit_code == 0, ran.output
    assert pl.read_parquet(project / "out" / f"{stem}.parquet").get_column("status").to_list() == ["ok"] * 5


def test_the_template_names_the_text_columns(project: Path) -> None:
    assert cli("init", "data/reviews.csv").exit_code == 0
    text = (project / "jobs" / "reviews.toml").read_text()
    data = tomllib.loads(text)
    assert data["prompt"]["user"] == "product: {product}\nstars: {stars}\ntext: {text}"
    assert data["job"]["id_column"] == "review_id"
    assert "#   stars                    Int64" in text  # detected columns, with their types


def test_schema_stub_gives_a_typed_column(project: Path, api: LocalAPI) -> None:
    result = cli("init", "data/reviews.csv", "--schema")
    assert result.exit_code == 0, result.output
    schema = project / "jobs" / "schemas" / "reviews.json"
    assert schema.exists()
    data = tomllib.loads((project / "jobs" / "reviews.toml").read_text())
    assert data["output"] == {"format": "json_schema", "schema": "schemas/reviews.json"}
    ran = cli(
        "run", "jobs/reviews.toml", "--base-url", api.base_url, "--endpoint", "local", "--limit", "3", "--no-progress"
    )
    assert ran.exit_code == 0, ran.output
    out = pl.read_parquet(project / "out" / "reviews.parquet")
    assert out.schema["answer"] == pl.String and out.get_column("answer").null_count() == 0


def test_never_overwrites_without_force(project: Path) -> None:
    job = project / "jobs" / "reviews.toml"
    job.parent.mkdir()
    job.write_text("# mine\n")
    result = cli("init", "data/reviews.csv")
    assert result.exit_code == 2
    assert result.output.strip() == (
        "seedbatch: error: jobs/reviews.toml: already exists; choose another --job path or pass --force to overwrite it"
    )
    assert job.read_text() == "# mine\n"
    assert cli("init", "data/reviews.csv", "--force").exit_code == 0
    assert "[prompt]" in job.read_text()


def test_paths_hold_from_another_folder(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli("init", "data/reviews.csv", "--job", "deep/er/labels.toml").exit_code == 0
    data = tomllib.loads((project / "deep" / "er" / "labels.toml").read_text())
    assert data["job"]["input"] == "../../data/reviews.csv"
    assert data["job"]["output"] == "../../out/labels.parquet"
    monkeypatch.chdir(project / "data")  # a cron entry runs from anywhere
    planned = cli("plan", str(project / "deep" / "er" / "labels.toml"), "--endpoint", "local")
    assert planned.exit_code == 0, planned.output


def test_an_input_that_cannot_be_read_is_one_line(project: Path) -> None:
    result = cli("init", "data/nope.csv")
    assert result.exit_code == 2
    assert (
        result.output.strip() == "seedbatch: error: data/nope.csv: input file not found (set job.input or pass --input)"
    )
    assert not (project / "jobs").exists()


def test_columns_with_spaces_quotes_and_punctuation_go_in_the_template(project: Path, api: LocalAPI) -> None:
    (project / "data" / "odd.csv").write_text('item_id,review text,"say ""hi""",a\\b\nr-1,Good,yes,x\nr-2,Bad,no,y\n')
    result = cli("init", "data/odd.csv")
    assert result.exit_code == 0, result.output
    data = tomllib.loads((project / "jobs" / "odd.toml").read_text())
    assert data["prompt"]["user"] == 'review text: {review text}\nsay "hi": {say "hi"}\na\\b: {a\\b}'
    ran = cli("run", "jobs/odd.toml", "--base-url", api.base_url, "--endpoint", "local", "--no-progress")
    assert ran.exit_code == 0, ran.output
    assert api.stats()["received"] == 2
