"""Function calling and ``[model.extra]`` end to end: ``seedbatch run``/``plan`` against the local API on loopback.

A forced function's arguments are the answer's document: validated against its parameters, re-asked when
malformed, spread into typed columns exactly like a json_schema answer; every call is kept in the
``tool_calls`` column. ``[model.extra]`` fields reach the server as written and are covered by the hash.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import polars as pl
import pytest
from click.testing import CliRunner, Result

from pipeline.cli import main
from pipeline.job.schema_types import column_dtypes
from pipeline.localapi import LocalAPI, ServerConfig
from pipeline.runner import ExitCode
from pipeline.tables.writer import OUTPUT_COLUMNS, TOOL_CALLS_DTYPE
from tests.helpers import ROOT

TOOLS = json.loads((ROOT / "jobs/tools/invoice_tools.json").read_text())
RECORD_INVOICE = TOOLS[0]["function"]["parameters"]
REVIEW_SCHEMA = json.loads((ROOT / "jobs/schemas/review_label.json").read_text())
INVOICES = ROOT / "data" / "invoices.jsonl"
REVIEWS = ROOT / "data" / "reviews.csv"


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def run_example(api: LocalAPI, out: Path, *flags: str) -> Result:
    """``jobs/tool_extract.toml`` as a user runs it, pointed at this test's local API and output."""
    job = str(ROOT / "jobs" / "tool_extract.toml")
    return cli(
        "run", job, "--endpoint", "local", "--base-url", api.base_url, "--output", str(out), "--rpm", "60000",
        "--no-progress", *flags,
    )  # fmt: skip


def write_job(tmp: Path, api: LocalAPI, body: str, *, input_path: Path = INVOICES, endpoint: str = "") -> Path:
    """A job file in ``tmp`` on ``api``: ``body`` holds its [model] keys and any other sections."""
    job = tmp / "job.toml"
    job.write_text(
        f'[job]\ninput = "{input_path}"\noutput = "out/result.parquet"\n\n'
        '[prompt]\nsystem = "Extract the fields."\nuser = "{text}"\n\n'
        f'[endpoint]\npreset = "local"\nbase_url = "{api.base_url}"\n{endpoint}\n'
        f"[limits]\nconcurrency = 16\nbackoff_max_s = 0.5\n\n{body}"
    )
    return job


def assert_forced_rows(out: pl.DataFrame, function: str, parameters: dict[str, Any]) -> None:
    """Every ok row's content is its call's arguments, valid, and equal to its typed columns; others are null."""
    validator = jsonschema.Draft202012Validator(parameters)
    typed = list(column_dtypes(parameters))
    for row in out.iter_rows(named=True):
        if row["status"] == "ok":
            doc = json.loads(row["content"])
            assert not list(validator.iter_errors(doc)), row["content"]
            calls = [c for c in row["tool_calls"] if c["name"] == function]
            assert json.loads(calls[0]["arguments"]) == doc
            for column in typed:
                value = row[column]
                assert value == doc[column] or (isinstance(value, float) and value == pytest.approx(doc[column]))
        else:
            assert all(row[c] is None for c in typed), row


def test_example_job_forced_function_fills_typed_columns(tmp_path: Path, api: LocalAPI) -> None:
    out = tmp_path / "tool_extract.parquet"
    result = run_example(api, out)
    assert result.exit_code == ExitCode.OK, result.output
    df = pl.read_parquet(out)
    inputs = pl.read_ndjson(INVOICES)
    print(f"\ntool_extract output schema: {df.schema}")
    expected = {**dict(inputs.schema), **OUTPUT_COLUMNS, **column_dtypes(RECORD_INVOICE)}
    assert dict(df.schema) == expected
    assert df.schema["tool_calls"] == TOOL_CALLS_DTYPE
    assert df.height == inputs.height
    assert df.get_column("status").unique().to_list() == ["ok"]
    assert df.get_column("finish_reason").unique().to_list() == ["tool_calls"]
    assert df.get_column("tool_calls").list.len().unique().to_list() == [1], "forced, parallel off: one call"
    assert_forced_rows(df, "record_invoice", RECORD_INVOICE)
    billed = api.stats()
    assert billed["answered_ok"] == inputs.height
    assert df.get_column("usd_spent").sum() == pytest.approx(billed["usd_spent"], rel=1e-9)
    assert df.get_column("prompt_tokens").sum() == billed["prompt_tokens"]


def test_malformed_arguments_are_reasked_and_never_reach_typed_columns(tmp_path: Path, api: LocalAPI) -> None:
    api.config = ServerConfig(invalid_arguments_rate=0.3, seed=11)
    out = tmp_path / "a.parquet"
    result = run_example(api, out)
    df = pl.read_parquet(out)
    assert_forced_rows(df, "record_invoice", RECORD_INVOICE)
    recovered = df.filter((pl.col("status") == "ok") & (pl.col("attempts") > 1))
    assert recovered.height >= 5, "about 30% of first calls are malformed: their re-asks must come back clean"
    # The re-ask went back as a tool conversation the server accepted (a malformed one would be a 400).
    assert df.get_column("error_kind").drop_nulls().is_in(["invalid_output"]).all()
    assert "invalid_output" in result.output  # the summary names the re-asked kind
    assert df.get_column("usd_spent").sum() == pytest.approx(api.stats()["usd_spent"], rel=1e-9)
    ok = df.filter(pl.col("status") == "ok").height
    print(f"\nmalformed arguments at 30%: {ok}/{df.height} ok, {recovered.height} recovered by a re-ask")

    # Every call malformed: each row gives up after its re-asks; the bad arguments are kept, nothing typed.
    api.reset()
    api.config = ServerConfig(invalid_arguments_rate=1.0, seed=11)
    out = tmp_path / "b.parquet"
    result = run_example(api, out)
    assert result.exit_code == ExitCode.ROWS_FAILED, result.output
    df = pl.read_parquet(out)
    assert df.get_column("status").unique().to_list() == ["invalid_output"]
    assert df.get_column("attempts").unique().to_list() == [3], "invalid_retries = 2: three calls per row"
    assert df.get_column("error").str.contains("arguments of record_invoice").all()
    assert df.get_column("tool_calls").list.len().min() == 1, "the last malformed call is kept for diagnosis"
    assert_forced_rows(df, "record_invoice", RECORD_INVOICE)
    assert api.stats()["answered_ok"] == 3 * df.height


def test_request_hash_covers_tools_and_extra(tmp_path: Path, api: LocalAPI) -> None:
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps(TOOLS))
    body = '[model]\nmax_tokens = 1024\ntools = "tools.json"\ntool_choice = "record_invoice"\n'
    job = write_job(tmp_path, api, body)
    rows = pl.read_ndjson(INVOICES).height

    assert cli("run", str(job), "--no-progress").exit_code == ExitCode.OK
    assert api.stats()["received"] == rows
    assert cli("run", str(job), "--no-progress").exit_code == ExitCode.OK
    assert api.stats()["received"] == rows, "nothing changed: nothing re-sent"

    changed = json.loads(json.dumps(TOOLS))
    changed[1]["function"]["description"] = "Flag an unreadable invoice."  # a function not even called
    tools_file.write_text(json.dumps(changed))
    assert cli("run", str(job), "--no-progress").exit_code == ExitCode.OK
    assert api.stats()["received"] == 2 * rows, "the tools are part of every request: all re-sent"

    job.write_text(job.read_text() + '\n[model.extra]\nprediction = {type = "content", content = "INVOICE"}\n')
    assert cli("run", str(job), "--no-progress").exit_code == ExitCode.OK
    assert api.stats()["received"] == 3 * rows, "an extra field changes the request: all re-sent"


def test_model_extra_reaches_the_server_as_written_and_is_warned(tmp_path: Path, api: LocalAPI) -> None:
    body = '[model]\nmax_tokens = 64\n\n[model.extra]\nprediction = {type = "content", content = "positive"}\n'
    job = write_job(tmp_path, api, body, input_path=REVIEWS)
    result = cli("run", str(job), "--no-progress")
    assert result.exit_code == ExitCode.OK, result.output
    warned = [line for line in result.output.splitlines() if "model.extra" in line]
    assert len(warned) == 1 and "prediction" in warned[0] and "unchecked" in warned[0], result.output
    plan = cli("plan", str(job))
    assert "warning        model.extra sends prediction as written: unchecked" in plan.output, plan.output

    # The server sees the field exactly as written: a shape the reference rejects is refused for every row,
    # which is a setup error: the run stops after those rows, quoting the server, and no row is a final error.
    bad = tmp_path / "bad"
    bad.mkdir()
    job = write_job(bad, api, '[model]\nmax_tokens = 64\n\n[model.extra]\nprediction = {type = "text"}\n',
                    input_path=REVIEWS)  # fmt: skip
    result = cli("run", str(job), "--no-progress", "--limit", "3")
    assert result.exit_code == ExitCode.FATAL_API, result.output
    assert "every row gets the same refusal" in result.output and "Invalid 'prediction'" in result.output
    assert "[model.extra]" in result.output
    df = pl.read_parquet(bad / "out" / "result.parquet")
    assert df.get_column("status").unique().to_list() == ["pending"]


def test_auto_choice_keeps_calls_and_text_answers(tmp_path: Path, api: LocalAPI) -> None:
    body = '[model]\nmax_tokens = 1024\ntools = "' + str(ROOT / "jobs/tools/invoice_tools.json") + '"\n'
    body += 'tool_choice = "auto"\nparallel_tool_calls = true\n'
    job = write_job(tmp_path, api, body)
    result = cli("run", str(job), "--no-progress")
    assert result.exit_code == ExitCode.OK, result.output
    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert "vendor" not in df.columns, "no function is forced: no typed columns"
    calls = df.get_column("tool_calls")
    texts = df.filter(calls.is_null())
    assert texts.height > 0 and texts.get_column("content").null_count() == 0, "some answers are plain text"
    assert calls.list.len().max() == 2, "parallel calls allowed: some answers call two functions"
    validators = {t["function"]["name"]: jsonschema.Draft202012Validator(t["function"]["parameters"]) for t in TOOLS}
    for row in calls.drop_nulls().to_list():
        for call in row:
            assert not list(validators[call["name"]].iter_errors(json.loads(call["arguments"])))


def test_required_choice_with_invalid_arguments_is_reasked(tmp_path: Path, api: LocalAPI) -> None:
    """Not forced: every call is still checked against its own function's parameters."""
    api.config = ServerConfig(invalid_arguments_rate=0.4, seed=3)
    body = '[model]\nmax_tokens = 1024\ntools = "' + str(ROOT / "jobs/tools/invoice_tools.json") + '"\n'
    body += 'tool_choice = "required"\n\n[output]\ninvalid_retries = 3\n'
    job = write_job(tmp_path, api, body)
    cli("run", str(job), "--no-progress")
    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert df.get_column("tool_calls").null_count() == 0, "required: every answer calls a function"
    assert df.filter((pl.col("status") == "ok") & (pl.col("attempts") > 1)).height > 0
    validators = {t["function"]["name"]: jsonschema.Draft202012Validator(t["function"]["parameters"]) for t in TOOLS}
    for row in df.filter(pl.col("status") == "ok").iter_rows(named=True):
        for call in row["tool_calls"]:
            assert not list(validators[call["name"]].iter_errors(json.loads(call["arguments"])))


def test_structured_output_tool_dialect_gives_json_schema_columns(tmp_path: Path, api: LocalAPI) -> None:
    body = (
        '[model]\nmax_tokens = 256\n\n[output]\nformat = "json_schema"\n'
        f'schema = "{ROOT / "jobs/schemas/review_label.json"}"\nname = "label"\n'
    )
    job = write_job(tmp_path, api, body, input_path=REVIEWS, endpoint='structured_output = "tool"\n')
    result = cli("run", str(job), "--no-progress", "--limit", "40")
    assert result.exit_code == ExitCode.OK, result.output
    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    for name, dtype in column_dtypes(REVIEW_SCHEMA).items():
        assert df.schema[name] == dtype, name
    names = {c["name"] for calls in df.get_column("tool_calls").to_list() for c in calls}
    assert names == {"label"}, "the schema travels as the forced function named output.name"
    assert_forced_rows(df, "label", REVIEW_SCHEMA)


def test_inline_tools_and_a_call_cut_at_max_tokens(tmp_path: Path, api: LocalAPI) -> None:
    """``[[model.tools]]`` inline works like a file; a forced call cut at max_tokens is ``truncated``."""
    body = (
        '[model]\nmax_tokens = 8\ntool_choice = "label"\n\n[[model.tools]]\ntype = "function"\n'
        'function = { name = "label", parameters = { type = "object", properties = { sentiment = '
        '{ type = "string", enum = ["positive", "negative", "neutral"] }, reason = { type = "string" } }, '
        'required = ["sentiment", "reason"] } }\n'
    )
    job = write_job(tmp_path, api, body, input_path=REVIEWS)
    result = cli("run", str(job), "--no-progress", "--limit", "10")
    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert df.schema["sentiment"] == pl.Enum(["positive", "negative", "neutral"])
    assert result.exit_code == ExitCode.ROWS_FAILED, result.output
    assert df.get_column("status").unique().to_list() == ["truncated"]
    assert df.get_column("sentiment").null_count() == df.height

    job.write_text(job.read_text().replace("max_tokens = 8", "max_tokens = 256"))
    result = cli("run", str(job), "--no-progress", "--limit", "10", "--retry-errors")
    assert result.exit_code == ExitCode.OK, result.output
    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert df.get_column("sentiment").null_count() == 0
    assert_forced_rows(df, "label", tomllib.loads(body)["model"]["tools"][0]["function"]["parameters"])
