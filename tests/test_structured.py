"""Structured extraction end to end: json_schema requests, validated answers, typed columns."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import polars as pl
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.job.schema_types import column_dtypes
from pipeline.localapi import LocalAPI, ServerConfig
from pipeline.runner import ExitCode
from tests.helpers import ROOT, example_job, make_spec, reviews, run

REVIEW_SCHEMA = json.loads((ROOT / "jobs/schemas/review_label.json").read_text())
INVOICE_SCHEMA = json.loads((ROOT / "jobs/schemas/invoice.json").read_text())


def assert_trustworthy(out: pl.DataFrame, schema: dict[str, object]) -> None:
    """Every ok row validates; no typed column holds a value from a row that is not ok."""
    validator = jsonschema.Draft202012Validator(schema)
    typed = list(column_dtypes(schema, "").keys())
    for row in out.iter_rows(named=True):
        if row["status"] == "ok":
            doc = json.loads(row["content"].strip().removeprefix("```json").removesuffix("```"))
            assert not list(validator.iter_errors(doc)), row["content"]
            assert all(row[c] == doc[c] or isinstance(doc[c], dict | list) for c in typed if c in doc)
        else:
            assert all(row[c] is None for c in typed), row


@pytest.mark.parametrize(
    ("job", "schema", "source"),
    [
        ("label_reviews.toml", REVIEW_SCHEMA, "data/reviews.csv"),
        ("extract_invoices.toml", INVOICE_SCHEMA, "data/invoices.jsonl"),
    ],
)
def test_example_jobs_give_typed_columns(
    tmp_path: Path, api: LocalAPI, job: str, schema: dict[str, object], source: str
) -> None:
    spec = example_job(job, tmp_path, api)
    summary = run(spec)
    assert summary.exit_code == ExitCode.OK
    out = pl.read_parquet(spec.job.output)
    inputs = pl.read_csv(ROOT / source) if source.endswith(".csv") else pl.read_ndjson(ROOT / source)
    assert out.height == inputs.height
    expected = {**dict(inputs.schema), **{k: v for k, v in dict(out.schema).items() if k not in inputs.columns}}
    assert dict(out.schema) == expected
    for name, dtype in column_dtypes(schema, "").items():
        assert out.schema[name] == dtype, name
    assert_trustworthy(out, schema)
    print(f"\n{job} output schema: {dict(out.schema)}")


def test_review_columns_have_the_mapped_types(tmp_path: Path, api: LocalAPI) -> None:
    spec = example_job("label_reviews.toml", tmp_path, api)
    run(spec)
    out = pl.read_parquet(spec.job.output)
    assert out.schema["sentiment"] == pl.Enum(["positive", "negative", "neutral"])
    assert out.schema["topics"] == pl.List(pl.Enum(["quality", "shipping", "support", "price", "packaging",
                                                     "usability", "other"]))  # fmt: skip
    assert out.schema["confidence"] == pl.Float64


def test_invoice_line_items_are_a_list_of_structs(tmp_path: Path, api: LocalAPI) -> None:
    spec = example_job("extract_invoices.toml", tmp_path, api)
    run(spec)
    out = pl.read_parquet(spec.job.output)
    line_items = out.schema["line_items"]
    assert isinstance(line_items, pl.List)
    assert isinstance(line_items.inner, pl.Struct)


def test_ten_percent_invalid_answers_never_reach_typed_columns(tmp_path: Path, api: LocalAPI) -> None:
    api.config = ServerConfig(invalid_json_rate=0.10, seed=5)
    spec = example_job("label_reviews.toml", tmp_path, api)
    summary = run(spec)
    out = pl.read_parquet(spec.job.output)
    assert_trustworthy(out, REVIEW_SCHEMA)
    recovered = out.filter((pl.col("status") == "ok") & (pl.col("attempts") > 1)).height
    assert recovered > 10, "with 10% invalid answers some rows must have been retried"
    # Every try was billed, and the row's cost counts all of them.
    billed = api.stats()
    assert out.get_column("usd_spent").sum() == pytest.approx(billed["usd_spent"], rel=1e-9)

    api.reset()
    api.config = ServerConfig(invalid_json_rate=0.10, seed=6)
    no_retry = example_job("label_reviews.toml", tmp_path / "b", api, output={"invalid_retries": 0})
    run(no_retry)
    out0 = pl.read_parquet(no_retry.job.output)
    invalid = out0.filter(pl.col("status") == "invalid_output")
    assert invalid.height > 10
    assert invalid.get_column("content").null_count() == 0, "the raw answer is kept"
    assert invalid.get_column("error").null_count() == 0
    assert_trustworthy(out0, REVIEW_SCHEMA)
    print(
        f"\ninvalid answers at 10%: retries on: {out.filter(pl.col('status') == 'ok').height}/{out.height} ok, "
        f"{recovered} recovered by retry, {summary.rows_by_status.get('invalid_output', 0)} invalid_output; "
        f"retries off: {out0.filter(pl.col('status') == 'ok').height}/{out0.height} ok, {invalid.height} invalid_output"
    )


def test_refusal_and_truncation(tmp_path: Path, api: LocalAPI) -> None:
    frame = reviews(4).with_columns(
        pl.when(pl.col("review_id") == "r-00001").then(pl.lit("[[refuse]] nope")).otherwise("text").alias("text")
    )
    spec = make_spec(
        tmp_path, api, frame, output={"format": "json_schema", "schema": REVIEW_SCHEMA, "name": "label"},
    )  # fmt: skip
    run(spec)
    out = pl.read_parquet(spec.job.output)
    refused = out.filter(pl.col("status") == "refused")
    assert refused.get_column("review_id").to_list() == ["r-00001"]
    assert refused.get_column("attempts").item() == 1, "a refusal is not retried with the same request"

    short = make_spec(
        tmp_path / "t", api, reviews(4), model={"max_tokens": 3},
        output={"format": "json_schema", "schema": REVIEW_SCHEMA, "truncated_retries": 0},
    )  # fmt: skip
    run(short)
    out = pl.read_parquet(short.job.output)
    assert out.get_column("status").unique().to_list() == ["truncated"]
    assert out.get_column("attempts").unique().to_list() == [1]

    grow = make_spec(
        tmp_path / "g", api, reviews(4), model={"max_tokens": 8},
        output={"format": "json_schema", "schema": REVIEW_SCHEMA, "truncated_retries": 5, "max_tokens_cap": 512},
    )  # fmt: skip
    run(grow)
    out = pl.read_parquet(grow.job.output)
    assert out.get_column("status").unique().to_list() == ["ok"]
    assert (out.get_column("attempts") > 1).all()  # doubled max_tokens until the answer fit


def test_json_object_mode(tmp_path: Path, api: LocalAPI) -> None:
    spec = make_spec(tmp_path, api, reviews(5), output={"format": "json_object"})
    run(spec)
    out = pl.read_parquet(spec.job.output)
    assert out.get_column("status").unique().to_list() == ["ok"]
    for content in out.get_column("content"):
        assert isinstance(json.loads(content), dict)


def _schema_job(tmp_path: Path, api: LocalAPI, schema_line: str, extra: str = "") -> Path:
    reviews(3).write_csv(tmp_path / "in.csv")
    job = tmp_path / "job.toml"
    job.write_text(
        f"""[job]
input = "{tmp_path / "in.csv"}"
output = "{tmp_path / "out.parquet"}"
[prompt]
user = "{{text}}"
[output]
format = "json_schema"
{schema_line}
{extra}
[endpoint]
preset = "local"
base_url = "{api.base_url}"
"""
    )
    return job


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("broken_json", "not valid JSON"),
        ("not_a_schema", "schema"),
        ("strict_additional", "additionalProperties"),
        ("strict_required", "required"),
        ("clash", "'text'"),
        ("missing_file", "schema file not found"),
    ],
)
def test_bad_schemas_fail_before_sending(tmp_path: Path, api: LocalAPI, case: str, expect: str) -> None:
    path = tmp_path / "schema.json"
    schemas = {
        "not_a_schema": {"type": "objekt", "properties": {"a": {"type": "string"}}},
        "strict_additional": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
        "strict_required": {
            "type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
            "required": ["a"], "additionalProperties": False,
        },
        "clash": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"],
                  "additionalProperties": False},
    }  # fmt: skip
    if case == "broken_json":
        path.write_text('{"type": "object", ')
    elif case in schemas:
        path.write_text(json.dumps(schemas[case]))
    job = _schema_job(tmp_path, api, f'schema = "{path}"', "strict = true")
    result = CliRunner().invoke(main, ["run", str(job), "--no-progress"])
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert expect in lines[0]
    assert api.stats()["received"] == 0
