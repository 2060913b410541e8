"""``confidence`` from token log-probabilities: the rule, the vote, the local API's shape, a job's column."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest
from openai.types.chat import ChatCompletion

from pipeline.answers.validator import confidence_of
from pipeline.errors import SpecError
from pipeline.job.spec import LOCAL_MODEL, spec_from_dict
from pipeline.localapi import LocalAPI, ServerConfig
from pipeline.localapi.handler import Handler, Reply
from pipeline.localapi.truth import SURE, UNSURE
from pipeline.quality.voting import combine, run_stages
from pipeline.records import ExitCode
from pipeline.state.patching import changed_positions
from tests.helpers import job_dict, quiet, run

LABELS = {
    "type": "object",
    "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]}},
    "required": ["sentiment"],
    "additionalProperties": False,
}


def _choice(*logprobs: float, refusal: list[float] | None = None) -> dict[str, Any]:
    tokens = [{"token": f"t{i}", "logprob": lp, "bytes": None, "top_logprobs": []} for i, lp in enumerate(logprobs)]
    refused = None if refusal is None else [{"token": "no", "logprob": lp, "top_logprobs": []} for lp in refusal]
    return {"index": 0, "message": {}, "logprobs": {"content": tokens, "refusal": refused}}


def test_confidence_is_the_mean_token_probability() -> None:
    assert confidence_of(_choice(math.log(0.9), math.log(0.5), 0.0)) == pytest.approx((0.9 + 0.5 + 1.0) / 3)
    # The mean, not the product: ten sure tokens score like one, whatever the answer's length.
    assert confidence_of(_choice(*[math.log(0.9)] * 10)) == pytest.approx(0.9)


def test_no_content_log_probabilities_is_no_confidence() -> None:
    assert confidence_of({"index": 0, "message": {}}) is None
    assert confidence_of({"index": 0, "message": {}, "logprobs": None}) is None
    assert confidence_of(_choice(refusal=[math.log(0.99)])) is None  # a refusal's tokens are not the answer's
    assert confidence_of({"logprobs": {"content": [{"token": "x", "logprob": "high"}]}}) is None


def _frame(
    contents: list[str], statuses: list[str], confidences: list[float | None], **fields: list[Any]
) -> pl.DataFrame:
    """One sample's output of one row per entry (the columns ``combine`` reads)."""
    n = len(contents)
    data: dict[str, Any] = {
        "review_id": [f"r{i}" for i in range(n)],
        "content": contents,
        "status": statuses,
        "usd_spent": [0.001] * n,
        "confidence": confidences,
        "request_hash": [f"h{i}" for i in range(n)],
        **fields,
    }
    return pl.DataFrame(data, schema_overrides={"confidence": pl.Float64})


def test_a_voted_row_takes_the_mean_confidence_of_the_majoritys_voters() -> None:
    samples = [
        _frame(["a", "a", "x"], ["ok", "ok", "error"], [0.9, 0.8, None]),
        _frame(["a", "b", "x"], ["ok", "ok", "error"], [0.7, 0.99, None]),
        _frame(["b", "a", "x"], ["ok", "ok", "error"], [0.99, None, None]),
    ]
    out = combine(samples)
    # Row 0: "a" wins with samples 0 and 1 (0.9, 0.7); the dissenter's 0.99 does not count.
    # Row 1: "a" wins with samples 0 and 2; sample 2 has no confidence: left out.
    # Row 2: no valid sample: no confidence.
    assert out.get_column("confidence").to_list() == pytest.approx([0.8, 0.8, None])


def test_a_schema_rows_confidence_is_its_least_sure_fields() -> None:
    samples = [
        _frame(["{}"] * 1, ["ok"], [0.9], sentiment=["positive"], topic=["price"]),
        _frame(["{}"] * 1, ["ok"], [0.6], sentiment=["positive"], topic=["quality"]),
        _frame(["{}"] * 1, ["ok"], [0.3], sentiment=["negative"], topic=["quality"]),
    ]
    out = combine(samples)
    # sentiment: positive (0.9, 0.6) → 0.75; topic: quality (0.6, 0.3) → 0.45; the row: the minimum.
    assert out.get_column("confidence").to_list() == pytest.approx([0.45])


def _local(body: dict[str, Any], config: ServerConfig | None = None) -> dict[str, Any]:
    handler = Handler(config or ServerConfig())
    reply = asyncio.run(handler.chat({}, orjson.dumps(body)))
    assert isinstance(reply, Reply) and reply.status == 200, reply
    data: dict[str, Any] = orjson.loads(reply.body)
    return data


def _body(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": LOCAL_MODEL,
        "messages": [{"role": "user", "content": text}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "l", "schema": LABELS, "strict": True}},
        **extra,
    }


def test_the_local_api_returns_openais_logprobs_when_asked() -> None:
    plain = _local(_body("Great kettle [[truth:sentiment=positive]]"))
    assert plain["choices"][0]["logprobs"] is None
    data = _local(_body("Great kettle [[truth:sentiment=positive]]", logprobs=True, top_logprobs=3))
    completion = ChatCompletion.model_validate(data)  # OpenAI's own types accept the shape
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    content = completion.choices[0].message.content or ""
    assert "".join(t.token for t in logprobs.content) == content
    assert all(len(t.top_logprobs) == 3 for t in logprobs.content)
    assert all(SURE[0] <= math.exp(t.logprob) < SURE[1] for t in logprobs.content)
    again = _local(_body("Great kettle [[truth:sentiment=positive]]", logprobs=True, top_logprobs=3))
    assert again["choices"][0]["logprobs"] == data["choices"][0]["logprobs"]  # deterministic per request body


def test_an_answer_made_wrong_on_purpose_is_unsure() -> None:
    config = ServerConfig(field_error_rates={"sentiment": 1.0})
    data = _local(_body("Great kettle [[truth:sentiment=positive]]", logprobs=True), config)
    assert orjson.loads(data["choices"][0]["message"]["content"])["sentiment"] != "positive"
    confidence = confidence_of(data["choices"][0])
    assert confidence is not None and UNSURE[0] <= confidence < UNSURE[1]


def test_top_logprobs_without_logprobs_is_a_400() -> None:
    handler = Handler(ServerConfig())
    reply = asyncio.run(handler.chat({}, orjson.dumps(_body("x", top_logprobs=2))))
    assert isinstance(reply, Reply) and reply.status == 400 and b"top_logprobs" in reply.body


def _job(tmp_path: Path, api: LocalAPI, n: int = 40, **sections: dict[str, Any]) -> dict[str, Any]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    truth = ["positive", "negative", "neutral"]
    frame = pl.DataFrame(
        {"review_id": [f"r{i}" for i in range(n)], "text": [f"review {i}" for i in range(n)]}
    ).with_columns(label=pl.Series([truth[i % 3] for i in range(n)]))
    frame.write_csv(tmp_path / "input.csv")
    sections = {
        "prompt": {"system": "Label it.", "user": "{text} [[truth:sentiment={label}]]"},
        "output": {"format": "json_schema", "schema": LABELS, "invalid_retries": 0},
        **sections,
    }
    return job_dict(tmp_path / "input.csv", tmp_path / "out" / "result.parquet", api.base_url, **sections)


def test_a_job_asking_for_logprobs_gets_a_confidence_column(tmp_path: Path, api: LocalAPI) -> None:
    api.config = ServerConfig(field_error_rates={"sentiment": 0.3})
    data = _job(tmp_path, api, model={"extra": {"logprobs": True}})
    assert run(spec_from_dict(data, tmp_path / "j.toml")).exit_code == ExitCode.OK
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out.schema["confidence"] == pl.Float64
    wrong = out.get_column("sentiment") != out.get_column("label")
    assert 0 < wrong.sum() < out.height
    assert (out.filter(wrong).get_column("confidence") < 0.6).all()
    assert (out.filter(~wrong).get_column("confidence") >= SURE[0]).all()
    without = _job(tmp_path / "plain", api)
    run(spec_from_dict(without, tmp_path / "j.toml"))
    assert pl.read_parquet(tmp_path / "plain" / "out" / "result.parquet").get_column("confidence").null_count() == 40


def test_escalation_by_confidence_sends_only_the_unsure_rows(tmp_path: Path, api: LocalAPI) -> None:
    api.config = ServerConfig(field_error_rates={"sentiment": 0.3})
    data = _job(
        tmp_path,
        api,
        model={"extra": {"logprobs": True}},
        escalation={"when_confidence_below": 0.6, "prompt": {"system": "Label it carefully."}},
    )
    spec = spec_from_dict(data, tmp_path / "j.toml")
    summary = run_stages(spec, quiet())
    first = pl.read_parquet(tmp_path / "out" / "result.parquet.votes" / "sample-0.parquet")
    unsure = first.get_column("sentiment") != first.get_column("label")
    assert 0 < unsure.sum() < first.height
    assert summary.requests_sent == first.height + unsure.sum()
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out.get_column("stage").to_list() == ["escalated" if u else "first" for u in unsure.to_list()]
    assert run_stages(spec, quiet()).requests_sent == 0


def test_when_confidence_below_needs_logprobs(tmp_path: Path, api: LocalAPI) -> None:
    data = _job(tmp_path, api, escalation={"when_confidence_below": 0.6, "model": {"max_tokens": 99}})
    with pytest.raises(SpecError, match=r"when_confidence_below needs \[model\.extra\] logprobs = true"):
        spec_from_dict(data, tmp_path / "j.toml")


def _with_field_named_confidence(tmp_path: Path, api: LocalAPI, **sections: dict[str, Any]) -> dict[str, Any]:
    schema = {
        "type": "object",
        "properties": {**LABELS["properties"], "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["sentiment", "confidence"],
        "additionalProperties": False,
    }
    data = _job(tmp_path, api, n=6, **sections)
    data["output"]["schema"] = schema
    return data


def test_a_schema_field_named_confidence_keeps_its_name_unless_the_job_asks_for_logprobs(
    tmp_path: Path, api: LocalAPI
) -> None:
    data = _with_field_named_confidence(tmp_path / "self", api)
    assert run(spec_from_dict(data, tmp_path / "j.toml")).exit_code == ExitCode.OK
    out = pl.read_parquet(tmp_path / "self" / "out" / "result.parquet")
    assert out.columns.count("confidence") == 1
    assert out.columns.index("confidence") > out.columns.index("request_hash")  # the model's field, typed
    assert out.get_column("confidence").null_count() == 0

    asks = _with_field_named_confidence(tmp_path / "asks", api, model={"extra": {"logprobs": True}})
    with pytest.raises(SpecError, match="typed column 'confidence' clashes with an existing column"):
        run(spec_from_dict(asks, tmp_path / "j.toml"))
    asks["output"]["column_prefix"] = "ans_"
    assert run(spec_from_dict(asks, tmp_path / "j.toml")).exit_code == ExitCode.OK
    both = pl.read_parquet(tmp_path / "asks" / "out" / "result.parquet")
    assert both.get_column("confidence").null_count() == 0 and both.get_column("ans_confidence").null_count() == 0


def test_an_input_column_named_confidence_is_kept_unless_the_job_asks_for_logprobs(
    tmp_path: Path, api: LocalAPI
) -> None:
    data = _job(tmp_path, api, n=3)
    pl.read_csv(tmp_path / "input.csv").with_columns(confidence=pl.lit(0.5)).write_csv(tmp_path / "input.csv")
    assert run(spec_from_dict(data, tmp_path / "j.toml")).exit_code == ExitCode.OK
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out.get_column("confidence").to_list() == [0.5] * 3
    data["model"]["extra"] = {"logprobs": True}
    with pytest.raises(SpecError, match="'confidence' clash with seedbatch's output columns"):
        run(spec_from_dict(data, tmp_path / "j.toml"))


def test_an_output_written_before_the_column_existed_is_rewritten_not_patched(tmp_path: Path, api: LocalAPI) -> None:
    data = _job(tmp_path, api, n=4)
    run(spec_from_dict(data, tmp_path / "j.toml"))
    path = tmp_path / "out" / "result.parquet"
    frames = [pl.read_csv(tmp_path / "input.csv").with_row_index("__row").with_columns(pl.col("__row").cast(pl.Int64))]
    assert changed_positions(path, frames, "__row", 100, 100) == []
    pl.read_parquet(path).drop("confidence").write_parquet(path)
    assert changed_positions(path, frames, "__row", 100, 100) is None
