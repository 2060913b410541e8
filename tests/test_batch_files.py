"""OpenAI Batch files in and out: a Batch input file run as a job (``job.input_format = "openai_batch"``) and
an OpenAI Batch-style output file (``job.batch_output``), through the CLI over real HTTP to the local API.

Output lines are checked against OpenAI's own types: every answered body is an
``openai.types.chat.ChatCompletion``, every error body's ``error`` an ``openai.types.shared.ErrorObject``.
The ``openai`` package has no type for the line around them, so ``BatchRequestOutput`` below transcribes
the ``BatchRequestOutput`` schema of OpenAI's API reference (OpenAPI), closed to extra keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import orjson
import polars as pl
import pytest
from click.testing import CliRunner, Result
from openai.types.chat import ChatCompletion
from openai.types.shared import ErrorObject
from pydantic import BaseModel, ConfigDict

from pipeline.cli import main
from pipeline.job.spec import load_spec
from pipeline.localapi import REFUSE_MARKER, LocalAPI, ServerConfig
from pipeline.requests.prepare import iter_requests, prepare
from pipeline.tables.batch_output import batch_line
from tests.helpers import ROOT, example_job, reviews, run, to_toml, write_job

LINE_KEYS = {"id", "custom_id", "response", "error"}
RESPONSE_KEYS = {"status_code", "request_id", "body"}


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class BatchResponse(_Closed):
    status_code: int
    request_id: str | None
    body: dict[str, Any]


class BatchError(_Closed):
    code: str | None
    message: str | None


class BatchRequestOutput(_Closed):
    """OpenAI's API reference, ``BatchRequestOutput``: the per-line object of the batch output file."""

    id: str
    custom_id: str
    response: BatchResponse | None
    error: BatchError | None


def checked(line: dict[str, Any]) -> ChatCompletion | ErrorObject | None:
    """The line validated as OpenAI's: its body as a ``ChatCompletion`` (200) or an ``ErrorObject``."""
    out = BatchRequestOutput.model_validate(line)
    if out.response is None:
        assert out.error is not None
        return None
    assert out.error is None
    if out.response.status_code == 200:
        return ChatCompletion.model_validate(out.response.body)
    assert set(out.response.body) == {"error"}
    return ErrorObject.model_validate(out.response.body["error"])


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, [*args])


def request(custom_id: str, text: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **body},
    }


def write_batch_job(tmp: Path, api: LocalAPI, lines: list[dict[str, Any]], **model: Any) -> Path:
    (tmp / "requests.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    data: dict[str, dict[str, Any]] = {
        "job": {
            "input": "requests.jsonl",
            "input_format": "openai_batch",
            "output": "out/result.parquet",
            "batch_output": "out/results.jsonl",
        },
        "model": {"name": "bytedance/dola-seed-2-0-lite", **model},
        "endpoint": {"preset": "local", "base_url": api.base_url},
    }
    job = tmp / "job.toml"
    job.write_text(to_toml(data))
    return job


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def bodies(job: Path) -> dict[str, dict[str, Any]]:
    p = prepare(load_spec(job), need_key=False)
    return {r.row_key: orjson.loads(r.body) for chunk in iter_requests(p) for r in chunk}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_example_batch_job_round_trip(tmp_path: Path, api: LocalAPI, stream: bool) -> None:
    spec = example_job(
        "openai_batch.toml",
        tmp_path,
        api,
        job={"batch_output": str(tmp_path / "out" / "b.jsonl")},
        endpoint={"stream": stream},
    )
    summary = run(spec)
    source = read_lines(ROOT / "data" / "batch_requests.jsonl")
    out = pl.read_parquet(spec.job.output)
    lines = read_lines(tmp_path / "out" / "b.jsonl")

    assert summary.rows_by_status == {"ok": len(source)}
    assert api.stats()["received"] == len(source)
    assert out.get_column("custom_id").to_list() == [x["custom_id"] for x in source]  # custom_id is the row id
    assert [x["custom_id"] for x in lines] == [x["custom_id"] for x in source]
    assert len({x["id"] for x in lines}) == len(lines)
    request_ids = set()
    for line, row in zip(lines, out.iter_rows(named=True), strict=True):
        assert set(line) == LINE_KEYS
        assert set(line["response"]) == RESPONSE_KEYS
        assert line["response"]["status_code"] == 200
        answer = checked(line)
        assert isinstance(answer, ChatCompletion)
        assert answer.id == row["response_id"]
        assert answer.model == row["model"]
        assert abs(answer.created - summary.started_at) < 60  # the server's clock, in Unix seconds
        assert answer.choices[0].message.content == row["content"]
        assert answer.choices[0].message.refusal is None and answer.choices[0].message.tool_calls is None
        assert answer.choices[0].finish_reason == row["finish_reason"]
        assert answer.usage is not None
        assert (answer.usage.prompt_tokens, answer.usage.total_tokens) == (row["prompt_tokens"], row["total_tokens"])
        request_ids.add(line["response"]["request_id"])
    # request_id is the server's x-request-id header, one per response (not the completion's id).
    assert len(request_ids) == len(lines) and all(r.startswith("req_") for r in request_ids)
    # A rerun answers every row from the ledger and writes the same lines: what they carry was kept.
    written = (tmp_path / "out" / "b.jsonl").read_bytes()
    again = run(spec)
    assert again.requests_sent == 0
    assert (tmp_path / "out" / "b.jsonl").read_bytes() == written


def test_body_fields_fill_what_the_job_does_not_set(tmp_path: Path, api: LocalAPI) -> None:
    lines = [
        request("a", "one", max_tokens=40, temperature=0.7, stream=True),
        request("b", "two", max_completion_tokens=50),
        request("c", "three"),
    ]
    loose = bodies(write_batch_job(tmp_path, api, lines))
    assert loose["a"]["model"] == "bytedance/dola-seed-2-0-lite"  # the job's model, never the line's
    assert (loose["a"]["max_tokens"], loose["a"]["temperature"]) == (40, 0.7)
    assert "stream" not in loose["a"]
    assert loose["b"]["max_tokens"] == 50 and "max_completion_tokens" not in loose["b"]
    assert loose["c"]["max_tokens"] == 1024 and "temperature" not in loose["c"]  # the job's defaults

    strict = bodies(write_batch_job(tmp_path, api, lines, max_tokens=20, temperature=0.0))
    assert {k: (v["max_tokens"], v["temperature"]) for k, v in strict.items()} == {
        "a": (20, 0.0),
        "b": (20, 0.0),
        "c": (20, 0.0),
    }


def test_bad_lines_and_refused_requests_in_the_output_file(tmp_path: Path, api: LocalAPI) -> None:
    lines = [
        request("good", "hello"),
        {**request("embed", "x"), "url": "/v1/embeddings"},
        {"custom_id": "no-body", "method": "POST", "url": "/v1/chat/completions", "body": None},
        {
            "custom_id": "robot",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "robot", "content": "hi"}]},
        },
        request("hot", "too hot", temperature=5),  # the server answers 400
    ]
    job = write_batch_job(tmp_path, api, lines)

    result = cli("run", str(job), "--no-progress")

    assert result.exit_code == 1, result.output
    assert api.stats()["received"] == 2  # "good" and "hot"; the bad lines were never sent
    out = {x["custom_id"]: x for x in read_lines(tmp_path / "out" / "results.jsonl")}
    assert out["good"]["response"]["status_code"] == 200
    for key, fragment in [("embed", "/v1/embeddings"), ("no-body", "no body"), ("robot", "unknown role 'robot'")]:
        assert set(out[key]) == LINE_KEYS
        assert out[key]["response"] is None
        assert out[key]["error"]["code"] == "messages"
        assert fragment in out[key]["error"]["message"]
    hot = out["hot"]
    assert hot["error"] is None
    assert hot["response"]["status_code"] == 400
    assert isinstance(checked(hot), ErrorObject)
    assert hot["response"]["request_id"].startswith("req_")
    # The error object is the server's, unchanged: the same request through OpenAI's SDK gets the same one.
    sent = bodies(job)["hot"]
    with openai.OpenAI(base_url=api.base_url, api_key="unused", max_retries=0) as sdk:
        try:
            sdk.chat.completions.create(**sent)
        except openai.BadRequestError as exc:
            assert hot["response"]["body"]["error"] == exc.body
            assert exc.body["param"] == "temperature" and exc.body["type"] == "invalid_request_error"
        else:
            raise AssertionError("the local API accepted temperature 5")
    for line in out.values():
        checked(line)


def test_batch_output_for_a_table_job_uses_the_id_column(tmp_path: Path, api: LocalAPI) -> None:
    job = write_job(tmp_path, api, reviews(4), job={"batch_output": str(tmp_path / "out" / "b.jsonl")})
    assert cli("run", str(job), "--no-progress").exit_code == 0
    lines = read_lines(tmp_path / "out" / "b.jsonl")
    assert [x["custom_id"] for x in lines] == reviews(4).get_column("review_id").to_list()
    # Without an id column a row is named by its number in the input, also under --sample.
    text = job.read_text().replace('id_column = "review_id"\n', "")
    job.write_text(text)
    assert cli("run", str(job), "--no-progress", "--sample", "2", "--sample-seed", "3").exit_code == 0
    picked = [x["custom_id"] for x in read_lines(tmp_path / "out" / "b.jsonl")]
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    numbers = [int(reviews(4).get_column("review_id").to_list().index(r)) for r in out.get_column("review_id")]
    assert picked == [str(n) for n in numbers]


#: A function for Batch lines to offer; the local API answers calls valid against its parameters.
LABEL_TOOL = {
    "type": "function",
    "function": {
        "name": "record_label",
        "description": "Record the review's label.",
        "parameters": {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": ["positive", "negative", "neutral"]}},
            "required": ["label"],
            "additionalProperties": False,
        },
    },
}
FORCED = {"type": "function", "function": {"name": "record_label"}}


def test_batch_lines_with_tools_are_judged_as_tool_call_answers(tmp_path: Path, api: LocalAPI) -> None:
    lines = [
        *(request(f"auto-{i}", f"Review {i}: fine kettle.", tools=[LABEL_TOOL], tool_choice="auto") for i in range(4)),
        request("forced", "Review: the lamp broke.", tools=[LABEL_TOOL], tool_choice=FORCED),
        request("required", "Review: noisy but works.", tools=[LABEL_TOOL], tool_choice="required"),
        request("refused", f"{REFUSE_MARKER} Review: ok.", tools=[LABEL_TOOL]),
    ]
    job = write_batch_job(tmp_path, api, lines)

    result = cli("run", str(job), "--no-progress")

    assert result.exit_code == 1, result.output  # the refused line
    assert api.stats()["received"] == len(lines)  # no re-ask: a call is an answer, not "no content"
    out = {x["custom_id"]: x for x in read_lines(tmp_path / "out" / "results.jsonl")}
    rows = {r["custom_id"]: r for r in pl.read_parquet(tmp_path / "out" / "result.parquet").iter_rows(named=True)}
    called = 0
    for custom_id in [x["custom_id"] for x in lines if x["custom_id"] != "refused"]:
        answer = checked(out[custom_id])
        assert isinstance(answer, ChatCompletion)
        assert rows[custom_id]["status"] == "ok", rows[custom_id]
        message = answer.choices[0].message
        if message.tool_calls is None:  # "auto" may answer in text
            assert custom_id.startswith("auto") and message.content
            continue
        called += 1
        assert answer.choices[0].finish_reason == "tool_calls"
        assert message.content is None  # as the server sent it
        call = message.tool_calls[0]
        assert call.type == "function" and call.function.name == "record_label"
        assert json.loads(call.function.arguments)["label"] in ("positive", "negative", "neutral")
        assert [c["arguments"] for c in rows[custom_id]["tool_calls"]] == [call.function.arguments]
    assert called >= 3  # forced, required and at least one auto
    refused = checked(out["refused"])
    assert isinstance(refused, ChatCompletion)
    assert refused.choices[0].message.refusal == "I'm sorry, but I can't help with that request."
    assert rows["refused"]["status"] == "refused"


def test_a_batch_lines_forced_call_is_checked_against_its_own_parameters(tmp_path: Path, api: LocalAPI) -> None:
    api.config = ServerConfig(invalid_arguments_rate=1.0, seed=11)  # every call's arguments come back broken
    job = write_batch_job(tmp_path, api, [request("forced", "Review: fine.", tools=[LABEL_TOOL], tool_choice=FORCED)])

    assert cli("run", str(job), "--no-progress").exit_code == 1
    row = pl.read_parquet(tmp_path / "out" / "result.parquet").row(0, named=True)
    assert row["status"] == "invalid_output"
    assert "record_label" in row["error"]
    assert api.stats()["received"] == 3  # the answer and the job's two re-asks (output.invalid_retries)
    assert isinstance(checked(read_lines(tmp_path / "out" / "results.jsonl")[0]), ChatCompletion)


def test_an_error_kept_without_the_servers_object_still_makes_an_openai_error_line() -> None:
    """A ledger entry from before the server's error object was kept: its message, without seedbatch's prefix."""
    row = {"status": "error", "error_kind": "http_400", "error": "HTTP 400: temperature must be <= 2"}
    line = batch_line("a", row)
    said = checked(line)
    assert isinstance(said, ErrorObject)
    assert (said.message, said.type, line["response"]["status_code"]) == ("temperature must be <= 2", "http_400", 400)
