"""The one definition of an answer: every ``Outcome`` field has one column, and what users see keeps its shape."""

from __future__ import annotations

import dataclasses

import polars as pl

from pipeline.answers import record as answer_record
from pipeline.answers.record import ANSWER_FIELDS, BATCH_COLUMNS, OUTPUT_COLUMNS, outcome_of, stored_values
from pipeline.records import Outcome, ToolCall, Usage
from pipeline.tables import writer

EVERY_FIELD_SET = Outcome(
    request_hash="f" * 32,
    status="ok",
    content="{}",
    reasoning_content="because",
    finish_reason="tool_calls",
    model="m",
    response_id="resp_1",
    usage=Usage(1, 2, 3, 4, 5, 6.5, 0.25),
    error="e",
    error_kind="k",
    attempts=3,
    unconfirmed_attempts=1,
    latency_ms=12.5,
    tool_calls=(ToolCall("call_1", "record", '{"a": 1}'),),
    created=1767225700,
    refusal="no",
    request_id="req_1",
    server_error='{"message": "x"}',
    confidence=0.875,
)


def _outcome_attributes() -> list[str]:
    names = []
    for f in dataclasses.fields(Outcome):
        if f.name == "usage":
            names += [f"usage.{u.name}" for u in dataclasses.fields(Usage)]
        else:
            names.append(f.name)
    return names


def test_every_outcome_field_has_exactly_one_column() -> None:
    assert sorted(f.attribute for f in ANSWER_FIELDS) == sorted(_outcome_attributes())
    assert len({f.name for f in ANSWER_FIELDS}) == len(ANSWER_FIELDS)


def test_an_outcome_survives_the_ledgers_form_whole() -> None:
    values = dict(zip((f.name for f in answer_record.STORED_FIELDS), stored_values(EVERY_FIELD_SET), strict=True))
    assert values["tool_calls"] == '[{"id":"call_1","name":"record","arguments":"{\\"a\\": 1}"}]'
    assert outcome_of({"request_hash": EVERY_FIELD_SET.request_hash, **values}) == EVERY_FIELD_SET


def test_the_output_columns_keep_their_order_and_types() -> None:
    """The columns users see after their input's, as the README lists them."""
    assert list(OUTPUT_COLUMNS) == [
        "content",
        "reasoning_content",
        "tool_calls",
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
        "status",
        "error",
        "error_kind",
        "attempts",
        "unconfirmed_attempts",
        "latency_ms",
        "confidence",
        "request_hash",
    ]
    assert writer.OUTPUT_COLUMNS is OUTPUT_COLUMNS
    assert OUTPUT_COLUMNS["tool_calls"] == writer.TOOL_CALLS_DTYPE
    assert {name for name, dtype in OUTPUT_COLUMNS.items() if dtype == pl.Float64} == {
        "credits_used",
        "usd_spent",
        "latency_ms",
        "confidence",
    }


def test_batch_lines_read_output_columns_only() -> None:
    assert set(BATCH_COLUMNS) <= set(OUTPUT_COLUMNS)
    assert {"status", "request_hash", "tool_calls", "content"} <= set(BATCH_COLUMNS)
