"""Outputs people open directly: the format follows the extension (.parquet, .csv, .jsonl).

Each test runs a real job against the local API (real HTTP, real SQLite ledger) and reads the file
back with polars / the json module, comparing with the Parquet output of the same answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import InputError, PartialOutputError, SpecError
from pipeline.job.spec import spec_from_dict
from pipeline.localapi import LocalAPI
from pipeline.records import ExitCode
from pipeline.tables.writer import write_output
from tests.helpers import ROOT, example_job, make_spec, reviews, run


def _rerun_as(tmp_path: Path, api: LocalAPI, name: str, first_ledger: Path) -> None:
    """The triage job again, written to ``name`` from the first run's ledger: nothing is sent."""
    spec = example_job(
        "triage_tickets.toml", tmp_path, api, job={"output": str(tmp_path / "out" / name), "ledger": str(first_ledger)}
    )
    before = api.stats()["received"]
    summary = run(spec)
    assert api.stats()["received"] == before, "a rerun into another format must be filled from the ledger"
    assert summary.exit_code in (ExitCode.OK, ExitCode.ROWS_FAILED)
    assert summary.output_path == str(tmp_path / "out" / name)


@pytest.fixture
def triage(tmp_path: Path, api: LocalAPI) -> Iterator[tuple[pl.DataFrame, Path]]:
    """The nested-schema example job (struct, list of structs, enum, nullable) run once to Parquet."""
    spec = example_job("triage_tickets.toml", tmp_path, api)
    run(spec)
    yield pl.read_parquet(spec.job.output), spec.ledger_path


def test_csv_output_holds_nested_columns_as_json_text(
    tmp_path: Path, api: LocalAPI, triage: tuple[pl.DataFrame, Path]
) -> None:
    parquet, ledger = triage
    _rerun_as(tmp_path, api, "triage.csv", ledger)
    csv = pl.read_csv(tmp_path / "out" / "triage.csv", infer_schema_length=0)  # every cell as the text written
    assert csv.columns == parquet.columns
    assert csv.height == parquet.height
    nested = [name for name, dtype in parquet.schema.items() if dtype.is_nested()]
    assert {"triage_customer", "triage_actions"} <= set(nested), parquet.schema
    for name in nested:
        for text, value in zip(csv.get_column(name).to_list(), parquet.get_column(name).to_list(), strict=True):
            assert (json.loads(text) if text is not None else None) == value, name
    # Scalars read back as the same values.
    assert csv.get_column("ticket_id").to_list() == [str(v) for v in parquet.get_column("ticket_id").to_list()]
    assert [int(v) for v in csv.get_column("prompt_tokens").to_list()] == parquet.get_column("prompt_tokens").to_list()
    assert csv.get_column("status").to_list() == parquet.get_column("status").to_list()
    print(f"\ncsv columns {csv.columns[-6:]}; first actions cell: {csv.get_column('triage_actions')[0]}")


def test_jsonl_output_keeps_nesting(tmp_path: Path, api: LocalAPI, triage: tuple[pl.DataFrame, Path]) -> None:
    parquet, ledger = triage
    _rerun_as(tmp_path, api, "triage.jsonl", ledger)
    lines = (tmp_path / "out" / "triage.jsonl").read_text().splitlines()
    assert len(lines) == parquet.height
    records = [json.loads(line) for line in lines]
    for record, expected in zip(records, parquet.iter_rows(named=True), strict=True):
        assert record["triage_customer"] == expected["triage_customer"]
        assert record["triage_actions"] == expected["triage_actions"]
        assert record["status"] == expected["status"]
        assert record["ticket_id"] == expected["ticket_id"]
    back = pl.read_ndjson(tmp_path / "out" / "triage.jsonl")
    assert isinstance(back.schema["triage_actions"], pl.List)
    assert isinstance(back.schema["triage_customer"], pl.Struct)


def test_show_and_status_read_csv_and_jsonl_outputs(tmp_path: Path, api: LocalAPI) -> None:
    for name in ("result.csv", "result.jsonl"):
        spec = make_spec(tmp_path / name, api, reviews(6), job={"output": str(tmp_path / name / "out" / name)})
        summary = run(spec)
        assert summary.exit_code == ExitCode.OK
        result = CliRunner().invoke(main, ["show", str(spec.job.output), "--rows", "2"])
        assert result.exit_code == 0, result.output
        assert result.output.count("── row") == 2
        assert "r-00001" in result.output
        result = CliRunner().invoke(main, ["show", str(spec.job.output), "--status", "error"])
        assert result.exit_code == 0, result.output
        assert "statuses there: ok=6" in result.output


def test_run_output_follows_its_own_extension(tmp_path: Path, api: LocalAPI) -> None:
    spec = make_spec(tmp_path, api, reviews(5), job={"run_output": str(tmp_path / "runs" / "{run_id}.jsonl")})
    summary = run(spec)
    written = tmp_path / "runs" / f"{summary.run_id}.jsonl"
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert [r["review_id"] for r in rows] == [f"r-{i:05d}" for i in range(5)]
    assert pl.read_parquet(spec.job.output).height == 5


def test_binary_cells_are_base64_text_in_csv(tmp_path: Path, api: LocalAPI) -> None:
    frame = reviews(3).with_columns(blob=pl.Series([b"\x00\x01", None, b"\xff"], dtype=pl.Binary))
    source = tmp_path / "input.parquet"
    frame.write_parquet(source)
    spec = spec_from_dict(
        {
            "job": {"input": str(source), "output": str(tmp_path / "out.csv"), "id_column": "review_id"},
            "prompt": {"user": "{text}"},
            "model": {"max_tokens": 16},
            "endpoint": {"preset": "local", "base_url": api.base_url},
        }
    )
    run(spec)
    back = pl.read_csv(tmp_path / "out.csv", infer_schema_length=0)
    assert back.get_column("blob").to_list() == ["AAE=", None, "/w=="]


def test_unknown_output_extension_is_one_line_at_load(tmp_path: Path) -> None:
    data = {"job": {"input": "in.csv", "output": "out/result.xlsx"}, "prompt": {"user": "{text}"}}
    with pytest.raises(SpecError) as err:
        spec_from_dict(data, "jobs/x.toml")
    assert "job.output 'out/result.xlsx': unknown output format '.xlsx'" in str(err.value)
    assert "\n" not in str(err.value)
    data["job"] = {"input": "in.csv", "output": "out/r.csv", "run_output": "runs/{date}.txt"}
    with pytest.raises(SpecError) as err:
        spec_from_dict(data, "jobs/x.toml")
    assert "job.run_output 'runs/{date}.txt': unknown output format '.txt'" in str(err.value)


@pytest.mark.parametrize("name", ["partial.csv", "partial.jsonl", "partial.parquet"])
def test_input_breaking_mid_write_leaves_a_partial_output_in_every_format(tmp_path: Path, name: str) -> None:
    """The writer's partial-output path is format-blind: the rows read before the break are written."""
    first = reviews(4).with_row_index("__row")

    def frames() -> Iterator[pl.DataFrame]:
        yield first
        raise InputError("data/in.csv: line 6: 4 fields but the header has 3")

    path = tmp_path / name
    with pytest.raises(PartialOutputError, match="a partial output of the 4 rows"):
        write_output(path, frames(), "__row", lambda lo, hi: {})
    if name.endswith(".csv"):
        back = pl.read_csv(path)
    elif name.endswith(".jsonl"):
        back = pl.read_ndjson(path)
    else:
        back = pl.read_parquet(path)
    assert back.get_column("review_id").to_list() == first.get_column("review_id").to_list()
    assert back.get_column("status").to_list() == ["pending"] * 4
    assert [p.name for p in tmp_path.iterdir()] == [name], "no temp file is left beside the output"


def test_example_csv_job_writes_a_csv(tmp_path: Path, api: LocalAPI) -> None:
    spec = example_job("demo_csv_output.toml", tmp_path, api)
    assert spec.job.output.name == "demo.csv"
    summary = run(spec)
    assert summary.exit_code == ExitCode.OK
    csv = pl.read_csv(spec.job.output, infer_schema_length=0)
    assert csv.height == pl.read_csv(ROOT / "data" / "reviews.csv").height
    assert all(isinstance(json.loads(t), list) for t in csv.get_column("topics").to_list())
