"""OpenAI Batch files in and out: a Batch input file run as a job (``job.input_format = "openai_batch"``) and
an OpenAI Batch-style output file (``job.batch_output``), through the CLI over real HTTP to the local API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import polars as pl
from click.testing import CliRunner, Result

from pipeline.cli import main
from pipeline.localapi import LocalAPI
from pipeline.prepare import iter_requests, prepare
from pipeline.spec import load_spec
from tests.helpers import ROOT, example_job, reviews, run, to_toml, write_job

LINE_KEYS = {"id", "custom_id", "response", "error"}
RESPONSE_KEYS = {"status_code", "request_id", "body"}


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


def test_example_batch_job_round_trip(tmp_path: Path, api: LocalAPI) -> None:
    spec = example_job("openai_batch.toml", tmp_path, api, job={"batch_output": str(tmp_path / "out" / "b.jsonl")})
    summary = run(spec)
    source = read_lines(ROOT / "data" / "batch_requests.jsonl")
    out = pl.read_parquet(spec.job.output)
    lines = read_lines(tmp_path / "out" / "b.jsonl")

    assert summary.rows_by_status == {"ok": len(source)}
    assert api.stats()["received"] == len(source)
    assert out.get_column("custom_id").to_list() == [x["custom_id"] for x in source]  # custom_id is the row id
    assert [x["custom_id"] for x in lines] == [x["custom_id"] for x in source]
    assert len({x["id"] for x in lines}) == len(lines)
    for line, row in zip(lines, out.iter_rows(named=True), strict=True):
        assert set(line) == LINE_KEYS
        assert line["error"] is None
        assert set(line["response"]) == RESPONSE_KEYS
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["id"] == row["response_id"] == line["response"]["request_id"]
        assert body["choices"][0]["message"] == {"role": "assistant", "content": row["content"]}
        assert body["choices"][0]["finish_reason"] == row["finish_reason"]
        assert body["usage"]["prompt_tokens"] == row["prompt_tokens"]
        assert body["usage"]["total_tokens"] == row["total_tokens"]


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
    assert "temperature" in hot["response"]["body"]["error"]["message"]


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
