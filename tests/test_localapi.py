"""Local API over real HTTP: validation, auth, markers, schema documents, usage, limits, faults, counters."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletion

from pipeline.localapi import PRIMING_TOKENS, LocalAPI, ServerConfig

KEY = "sk-local-SECRET-9137"
MODEL = "bytedance/dola-seed-2-0-lite"
TOKEN = re.compile(r"\w+|[^\w\s]")
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
ROOT = Path(__file__).resolve().parents[1]


def body(text: str = "The service was quick and friendly.", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def schema_body(schema: dict[str, Any], text: str = "Classify this.", **extra: Any) -> dict[str, Any]:
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "strict": True, "schema": schema}}
    return body(text, response_format=fmt, **extra)


def ntok(text: str) -> int:
    return len(TOKEN.findall(text))


@pytest.fixture
def serve() -> Iterator[Any]:
    """Start a LocalAPI with the given config; every server started is stopped at teardown."""
    started: list[LocalAPI] = []

    def start(**config: Any) -> tuple[LocalAPI, httpx.Client]:
        api = LocalAPI(ServerConfig(**config))
        api.start()
        started.append(api)
        client = httpx.Client(base_url=api.base_url, timeout=5)
        clients.append(client)
        return api, client

    clients: list[httpx.Client] = []
    yield start
    for client in clients:
        client.close()
    for api in started:
        api.stop()


def post(client: httpx.Client, payload: Any, **kw: Any) -> httpx.Response:
    return client.post("/chat/completions", content=orjson.dumps(payload), **kw)


def content(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


# ---------------------------------------------------------------- validation, auth, model


def _with_part(part: dict[str, Any]) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]}


BAD_REQUESTS = [
    pytest.param(body(temperature=2.5), "temperature", id="temperature>2"),
    pytest.param(body(temperature="hot"), "temperature", id="temperature-string"),
    pytest.param(body(top_p=0.0), "top_p", id="top_p<0.01"),
    pytest.param(body(frequency_penalty=-3), "frequency_penalty", id="frequency_penalty"),
    pytest.param(body(max_tokens=0), "max_tokens", id="max_tokens=0"),
    pytest.param(body(seed=0), "seed", id="seed=0"),
    pytest.param(body(reasoning_effort="max"), "reasoning_effort", id="reasoning_effort"),
    pytest.param(body(response_format={"type": "yaml"}), "response_format.type", id="response_format"),
    pytest.param(
        body(response_format={"type": "json_schema", "json_schema": {"name": "bad name!"}}),
        "response_format.json_schema.name",
        id="schema-name",
    ),
    pytest.param(
        _with_part({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not-b64@@"}}),
        "messages[0].content[1].image_url.url",
        id="data-uri-bad-base64",
    ),
    pytest.param(
        _with_part({"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AAAA"}}),
        "messages[0].content[1].image_url.url",
        id="data-uri-bad-mime",
    ),
    pytest.param(
        _with_part({"type": "image_url", "image_url": {"url": "data:image/png,AAAA"}}),
        "messages[0].content[1].image_url.url",
        id="data-uri-no-base64",
    ),
    pytest.param(
        _with_part({"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}),
        "messages[0].content[1].image_url.url",
        id="image-ftp-url",
    ),
    pytest.param(
        _with_part({"type": "image_url", "image_url": {"url": "https://x.test/a.png", "detail": "max"}}),
        "messages[0].content[1].image_url.detail",
        id="image-detail",
    ),
    pytest.param(
        _with_part({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,"}}),
        "messages[0].content[1].video_url.url",
        id="video-empty-data",
    ),
    pytest.param(_with_part({"type": "audio", "audio": {}}), "messages[0].content[1].type", id="bad-part-type"),
    pytest.param(_with_part({"type": "text"}), "messages[0].content[1].text", id="text-part-no-text"),
    pytest.param({"model": MODEL, "messages": []}, "messages", id="empty-messages"),
    pytest.param({"model": MODEL}, "messages", id="no-messages"),
    pytest.param({"messages": [{"role": "user", "content": "x"}]}, "model", id="no-model"),
    pytest.param({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", id="bad-role"),
    pytest.param(
        {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content", id="content-number"
    ),
    pytest.param([1, 2], None, id="body-not-object"),
    pytest.param(body(tools={"type": "function"}), "tools", id="tools-not-array"),
    pytest.param(body(tools=[{"type": "retrieval"}]), "tools[0]", id="tool-not-function"),
    pytest.param(
        body(tools=[{"type": "function", "function": {"name": "f"}}]), "tools[0].function.parameters", id="no-params"
    ),
    pytest.param(
        body(tools=[{"type": "function", "function": {"name": "bad name", "parameters": {}}}]),
        "tools[0].function.name",
        id="function-name",
    ),
    pytest.param(
        body(
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        ),
        "tool_choice",
        id="tool-choice-unknown-function",
    ),
    pytest.param(body(tool_choice="required"), "tool_choice", id="tool-choice-without-tools"),
    pytest.param(body(parallel_tool_calls="yes"), "parallel_tool_calls", id="parallel-not-bool"),
    pytest.param(body(prediction={"type": "text", "content": "x"}), "prediction", id="prediction-type"),
    pytest.param(body(stream_options={"include_usage": 1}), "stream_options", id="stream-options"),
]


@pytest.mark.parametrize(("payload", "param"), BAD_REQUESTS)
def test_validation_400(serve: Any, payload: Any, param: str | None) -> None:
    api, client = serve()
    r = post(client, payload)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["code"] is None
    assert err["message"]
    assert api.stats()["by_status"] == {400: 1}


def test_body_not_json_is_400(serve: Any) -> None:
    _, client = serve()
    r = client.post("/chat/completions", content=b"{not json")
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_valid_variants_accepted(serve: Any) -> None:
    """Everything the reference allows must pass: a too-strict fake would hide client bugs the other way."""
    _, client = serve()
    full = body(
        temperature=0,
        top_p=1,
        frequency_penalty=-2,
        presence_penalty=2,
        seed=1,
        max_tokens=200,
        reasoning_effort="high",
        response_format={"type": "text"},
        stream=False,
    )
    full["messages"] = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "t", "type": "function"}]},
        {"role": "tool", "content": "42", "tool_call_id": "t"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg", "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "data:image/jpg;base64," + base64.b64encode(PNG).decode()}},
                {"type": "video_url", "video_url": {"url": "data:video/quicktime;base64,AAAA"}},
            ],
        },
    ]
    assert post(client, full).status_code == 200


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}], ids=["missing", "wrong", "no-bearer"]
)
def test_401_without_the_key(serve: Any, headers: dict[str, str]) -> None:
    api, client = serve(require_key=KEY)
    r = post(client, body(), headers=headers)
    assert r.status_code == 401
    assert KEY not in r.text
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/models", headers=headers).status_code == 401
    ok = post(client, body(), headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200
    assert api.stats()["by_status"] == {401: 1, 200: 1}


def test_auth_is_checked_before_model_and_validation(serve: Any) -> None:
    _, client = serve(require_key=KEY)
    assert post(client, {"model": "missing-model"}).status_code == 401
    assert post(client, {"model": "missing-model"}, headers={"Authorization": f"Bearer {KEY}"}).status_code == 404


def test_missing_model_404(serve: Any) -> None:
    _, client = serve()
    r = post(client, body(model="missing-model"))
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


def test_models_and_unknown_models_as_the_openai_sdk_sees_them(serve: Any) -> None:
    api, _ = serve(models=(MODEL, "gpt-4o-mini"))
    sdk = openai.OpenAI(base_url=api.base_url, api_key="unused", max_retries=0)
    try:
        assert [m.id for m in sdk.models.list()] == [MODEL, "gpt-4o-mini"]
        model = sdk.models.retrieve(MODEL)  # the id's slash travels percent-encoded
        assert isinstance(model, openai.types.Model)
        assert (model.id, model.object) == (MODEL, "model")
        answer = sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert isinstance(answer, ChatCompletion)
        assert answer._request_id is not None and answer._request_id.startswith("req_")
        with pytest.raises(openai.NotFoundError) as missing:
            sdk.models.retrieve("gpt-4o-mimi")
        assert (missing.value.code, missing.value.param) == ("model_not_found", "model")
        with pytest.raises(openai.NotFoundError) as unknown:
            sdk.chat.completions.create(
                model="bytedance/dola-seed-2-0-litee", messages=[{"role": "user", "content": "hi"}]
            )
        err = unknown.value
        assert (err.status_code, err.type, err.param, err.code) == (
            404,
            "invalid_request_error",
            "model",
            "model_not_found",
        )
        assert "bytedance/dola-seed-2-0-litee" in err.message
        assert err.request_id is not None
    finally:
        sdk.close()
    assert api.stats()["by_status"] == {200: 1, 404: 1}


def test_small_endpoints(serve: Any) -> None:
    api, client = serve(model_name="local-x")
    assert client.get(api.base_url.removesuffix("/v1") + "/health").json() == {"status": "ok"}
    models = client.get("/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL, "seed-2-0-lite-local"]
    assert post(client, body()).json()["model"] == "local-x"


# ---------------------------------------------------------------- markers


@pytest.mark.parametrize("status", [400, 422, 429, 500, 503])
def test_status_marker(serve: Any, status: int) -> None:
    api, client = serve()
    payload = body(response_format={"type": "json_object"})
    payload["messages"] = [
        {"role": "system", "content": "[[status:200]] is ignored here"},
        {"role": "user", "content": [{"type": "text", "text": f"row 7 [[status:{status}]]"}]},
    ]
    r = post(client, payload)
    assert r.status_code == status
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert api.stats()["by_status"] == {status: 1}
    # Only the last user message counts: an earlier one carrying the marker is history.
    payload["messages"].append({"role": "user", "content": "and now?"})
    assert post(client, payload).status_code == 200


def test_refusal_marker(serve: Any) -> None:
    _, client = serve()
    r = post(client, body("please [[refuse]]"))
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] is None
    assert isinstance(choice["message"]["refusal"], str) and choice["message"]["refusal"]
    assert choice["finish_reason"] == "stop"
    assert r.json()["usage"]["completion_tokens"] == ntok(choice["message"]["refusal"])


# ---------------------------------------------------------------- content


SCHEMAS: dict[str, dict[str, Any]] = {
    "nested-arrays-of-objects": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "minLength": 12, "maxLength": 20},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                        "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True, "minItems": 3},
                        "grid": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                    },
                    "required": ["name", "qty", "tags", "grid"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["items"],
        "additionalProperties": False,
    },
    "enums-and-scalars": {
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": ["pos", "neg", "neu"]},
            "stars": {"enum": [1, 2, 3, 4, 5]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "tiny": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.001},
            "price": {"type": "number", "multipleOf": 0.01, "minimum": 1, "maximum": 5},
            "count": {"type": "integer", "multipleOf": 5, "minimum": 1, "maximum": 50},
            "flag": {"type": "boolean"},
            "kind": {"const": "review"},
            "day": {"type": "string", "format": "date"},
            "nothing": {"type": "null"},
        },
        "required": ["label", "stars", "confidence", "tiny", "price", "count", "flag", "kind", "day", "nothing"],
        "additionalProperties": False,
    },
    "nullable-unions": {
        "type": "object",
        "properties": {
            "a": {"type": ["string", "null"]},
            "b": {"anyOf": [{"type": "null"}, {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 3}]},
            "c": {"oneOf": [{"type": "string", "format": "date"}, {"type": "null"}]},
            "d": {"type": ["null", "array"], "items": {"type": "boolean"}, "maxItems": 1},
        },
        "required": ["a", "b", "c", "d"],
        "additionalProperties": False,
    },
    "refs": {
        "$defs": {
            "person": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "born": {"type": "string", "format": "date"}},
                "required": ["name", "born"],
                "additionalProperties": False,
            },
            "role": {"type": "string", "enum": ["author", "editor"]},
            "named": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
        },
        "type": "object",
        "properties": {
            "author": {"$ref": "#/$defs/person"},
            "reviewers": {"type": "array", "items": {"$ref": "#/$defs/person"}, "minItems": 2},
            "role": {"$ref": "#/$defs/role"},
            "both": {
                "allOf": [{"$ref": "#/$defs/named"}, {"properties": {"x": {"type": "integer"}}, "required": ["x"]}]
            },
        },
        "required": ["author", "reviewers", "role", "both"],
    },
    "recursive-tree": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "value": {"type": "integer"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                    "parent": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]},
                },
                "required": ["value", "children", "parent"],
            }
        },
        "$ref": "#/$defs/node",
    },
    "top-level-array": {"type": "array", "items": {"type": "string", "enum": ["x", "y"]}, "minItems": 1, "maxItems": 1},
}


def _check(schema: dict[str, Any], document: Any) -> None:
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(document)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_documents_validate(serve: Any, name: str) -> None:
    schema = SCHEMAS[name]
    _, client = serve()
    for i in range(12):  # different messages land in different generator buckets
        doc = orjson.loads(content(post(client, schema_body(schema, f"row {i}"))))
        _check(schema, doc)
    # The llama.cpp dialect: the schema riding on json_object.
    llama = body("row x", response_format={"type": "json_object", "schema": schema})
    _check(schema, orjson.loads(content(post(client, llama))))


def _tool(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def test_forced_function_calls_carry_valid_arguments(serve: Any) -> None:
    _, client = serve()
    schema = SCHEMAS["enums-and-scalars"]
    tools = [_tool("record", schema), _tool("other", {"type": "object", "properties": {"x": {"type": "string"}}})]
    for i in range(8):
        forced = {"type": "function", "function": {"name": "record"}}
        data = post(client, body(f"row {i}", tools=tools, tool_choice=forced)).json()
        choice = data["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["function"]["name"] == "record" and call["id"].startswith("call_")
        _check(schema, orjson.loads(call["function"]["arguments"]))
        assert data["usage"]["completion_tokens"] == ntok(call["function"]["arguments"])
    # The definitions are billed as prompt text.
    plain = post(client, body("row 0")).json()["usage"]["prompt_tokens"]
    assert post(client, body("row 0", tools=tools)).json()["usage"]["prompt_tokens"] > plain
    # "none" never calls; "required" always does.
    assert (
        "tool_calls" not in post(client, body("row 0", tools=tools, tool_choice="none")).json()["choices"][0]["message"]
    )
    for i in range(8):
        message = post(client, body(f"row {i}", tools=tools, tool_choice="required")).json()["choices"][0]["message"]
        assert message["tool_calls"]


def test_a_call_cut_at_max_tokens_is_truncated_json(serve: Any) -> None:
    _, client = serve()
    forced = {"type": "function", "function": {"name": "record"}}
    tools = [_tool("record", SCHEMAS["enums-and-scalars"])]
    choice = post(client, body(tools=tools, tool_choice=forced, max_tokens=5)).json()["choices"][0]
    assert choice["finish_reason"] == "length"
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])


def test_invalid_arguments_rate_breaks_calls_and_a_retry_can_recover(serve: Any) -> None:
    _, client = serve(invalid_arguments_rate=0.5, seed=4)
    schema = SCHEMAS["enums-and-scalars"]
    forced = {"type": "function", "function": {"name": "record"}}
    broken = recovered = 0
    for i in range(30):
        payload = body(f"row {i}", tools=[_tool("record", schema)], tool_choice=forced)
        for attempt in range(4):
            arguments = post(client, payload).json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
            try:
                _check(schema, orjson.loads(arguments))
            except (orjson.JSONDecodeError, jsonschema.ValidationError):
                broken += 1
                continue
            recovered += attempt > 0
            break
    assert broken > 5 and recovered > 3, (broken, recovered)


def test_json_object_without_schema(serve: Any) -> None:
    _, client = serve()
    doc = orjson.loads(content(post(client, body(response_format={"type": "json_object"}))))
    assert set(doc) == {"answer"} and isinstance(doc["answer"], str)


def test_text_answer_is_a_label(serve: Any) -> None:
    _, client = serve()
    labels = {content(post(client, body(f"review {i}"))).split(".")[0] for i in range(30)}
    assert labels == {"positive", "negative", "neutral"}


def test_deterministic_per_messages(serve: Any) -> None:
    """Same messages, same answer: across repeats, sampling parameters and separate servers."""
    _, one = serve(seed=1)
    _, two = serve(seed=2, latency_jitter_ms=5)
    first = content(post(one, body("hello")))
    assert content(post(one, body("hello"))) == first
    assert content(post(two, body("hello", temperature=1.5))) == first
    answers = {content(post(one, body(f"hello {i}"))) for i in range(20)}
    assert len(answers) > 3
    schema = SCHEMAS["refs"]
    assert content(post(one, schema_body(schema))) == content(post(two, schema_body(schema)))


def test_media_echo_tokens(serve: Any) -> None:
    _, client = serve()
    url = "https://example.com/cat.png"
    video = b"\x00\x00\x00\x18ftypmp42" + bytes(40)
    parts = [
        {"type": "text", "text": "describe"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()}},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(video).decode()}},
    ]
    payload: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": parts}]}
    text = content(post(client, payload))
    assert f"[image:{hashlib.sha256(PNG).hexdigest()[:12]}]" in text
    assert f"[image:{hashlib.sha256(url.encode()).hexdigest()[:12]}]" in text
    assert f"[video:{hashlib.sha256(video).hexdigest()[:12]}]" in text
    # JSON answers carry them too, in the answer field or the first free-text string.
    payload["response_format"] = {"type": "json_object"}
    assert f"[image:{hashlib.sha256(PNG).hexdigest()[:12]}]" in orjson.loads(content(post(client, payload)))["answer"]
    schema = {
        "type": "object",
        "properties": {"label": {"enum": ["a", "b"]}, "caption": {"type": "string"}},
        "required": ["label", "caption"],
    }
    payload["response_format"] = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
    doc = orjson.loads(content(post(client, payload)))
    _check(schema, doc)
    assert f"[video:{hashlib.sha256(video).hexdigest()[:12]}]" in doc["caption"]


# ---------------------------------------------------------------- usage


def test_usage_and_meta(serve: Any) -> None:
    _, client = serve(input_per_million=1.5, output_per_million=6.0)
    payload = {
        "model": MODEL,
        "reasoning_effort": "medium",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Hello, world!"},
                    {"type": "image_url", "image_url": {"url": "https://e.com/a.png"}},
                    {"type": "video_url", "video_url": {"url": "https://e.com/v.mp4"}},
                ],
            },
        ],
    }
    data = post(client, payload).json()
    usage, message = data["usage"], data["choices"][0]["message"]
    assert usage["prompt_tokens"] == 3 + 4 + 2 * 4 + PRIMING_TOKENS + 85 + 200
    reasoning = ntok(message["reasoning_content"])
    assert usage["completion_tokens_details"] == {"reasoning_tokens": reasoning}
    assert usage["completion_tokens"] == ntok(message["content"]) + reasoning
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    usd = usage["prompt_tokens"] * 1.5e-6 + usage["completion_tokens"] * 6e-6
    assert data["meta"]["usage"]["usd_spent"] == pytest.approx(usd)
    assert data["meta"]["usage"]["credits_used"] == round(usd * 2_000_000)
    assert data["id"].startswith("chatcmpl-local-")
    assert data["object"] == "chat.completion" and data["service_tier"] == "default"
    assert data["choices"][0]["logprobs"] is None and message["refusal"] is None


def test_reasoning_grows_with_effort(serve: Any) -> None:
    _, client = serve()
    plain = post(client, body()).json()
    assert "reasoning_content" not in plain["choices"][0]["message"]
    assert plain["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    sizes = [
        post(client, body(reasoning_effort=e)).json()["usage"]["completion_tokens_details"]["reasoning_tokens"]
        for e in ("low", "medium", "high")
    ]
    assert 0 < sizes[0] < sizes[1] < sizes[2]


def test_max_tokens_truncates(serve: Any) -> None:
    _, client = serve()
    data = post(client, body(max_tokens=3)).json()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 3 == ntok(choice["message"]["content"])
    full = content(post(client, body()))
    assert full.startswith(choice["message"]["content"]) and len(full) > len(choice["message"]["content"])
    # A JSON answer cut short is broken JSON, as with a real model.
    cut = post(client, schema_body(SCHEMAS["enums-and-scalars"], max_tokens=6)).json()["choices"][0]
    assert cut["finish_reason"] == "length"
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(cut["message"]["content"])
    # Reasoning spends the budget first.
    thought = post(client, body(max_tokens=4, reasoning_effort="high")).json()
    assert thought["choices"][0]["message"]["content"] == ""
    assert thought["usage"]["completion_tokens_details"]["reasoning_tokens"] == 4
    assert post(client, body(max_tokens=500)).json()["choices"][0]["finish_reason"] == "stop"


# Rate limits: tests/test_localapi_limits.py (on a fake clock).


# ---------------------------------------------------------------- faults


async def _fire(base_url: str, payloads: list[bytes], concurrency: int = 32) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=10, limits=limits) as client:
        return await asyncio.gather(*(client.post("/chat/completions", content=p) for p in payloads))


def test_5xx_rate_roughly_honoured(serve: Any) -> None:
    api, _ = serve(fail_5xx_rate=0.2, seed=7)
    responses = asyncio.run(_fire(api.base_url, [orjson.dumps(body(f"row {i}")) for i in range(400)]))
    failed = [r.status_code for r in responses if r.status_code != 200]
    assert 50 <= len(failed) <= 110
    assert set(failed) == {500, 502, 503}
    stats = api.stats()
    assert stats["answered_ok"] == 400 - len(failed) and stats["received"] == 400


def test_invalid_json_rate_mixes_failures_and_retries_recover(serve: Any) -> None:
    schema = SCHEMAS["enums-and-scalars"]
    api, client = serve(invalid_json_rate=0.3)
    payloads = [orjson.dumps(schema_body(schema, f"row {i}")) for i in range(400)]
    responses = asyncio.run(_fire(api.base_url, payloads))
    kinds: dict[str, int] = {"ok": 0, "not_json": 0, "fenced": 0, "off_schema": 0}
    bad: list[bytes] = []
    for payload, response in zip(payloads, responses, strict=True):
        text = content(response)
        try:
            _check(schema, orjson.loads(text))
            kinds["ok"] += 1
            continue
        except orjson.JSONDecodeError:
            kinds["fenced" if text.startswith("```json") else "not_json"] += 1
        except jsonschema.ValidationError:
            kinds["off_schema"] += 1
        bad.append(payload)
    assert 0.2 <= len(bad) / 400 <= 0.4, kinds
    assert min(kinds.values()) > 10, kinds
    # A retry is the next attempt of the same body and rolls again, deterministically.
    first = bad[0]
    retries = [content(client.post("/chat/completions", content=first)) for _ in range(10)]
    outcomes = []
    for text in retries:
        try:
            _check(schema, orjson.loads(text))
            outcomes.append(True)
        except (orjson.JSONDecodeError, jsonschema.ValidationError):
            outcomes.append(False)
    assert any(outcomes)
    api.reset()  # forgets attempt counts: the same sequence of answers comes back
    replay = [content(client.post("/chat/completions", content=first)) for _ in range(11)]
    assert replay == [content(responses[payloads.index(first)]), *retries]
    # Text requests are never corrupted.
    assert all(r.status_code == 200 for r in asyncio.run(_fire(api.base_url, [orjson.dumps(body())] * 20)))


def test_invalid_json_without_schema_is_still_broken(serve: Any) -> None:
    api, _ = serve(invalid_json_rate=1.0)
    payloads = [orjson.dumps(body(f"r{i}", response_format={"type": "json_object"})) for i in range(30)]
    for response in asyncio.run(_fire(api.base_url, payloads)):
        text = content(response)
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError:
            continue
        assert not (isinstance(doc, dict) and set(doc) == {"answer"})


def test_drop_is_a_transport_error(serve: Any) -> None:
    api, client = serve(drop_rate=1.0)
    with pytest.raises(httpx.RemoteProtocolError):
        post(client, body())
    api.config.drop_rate = 0.0
    assert post(client, body()).status_code == 200
    stats = api.stats()
    assert stats["dropped"] == 1 and stats["received"] == 2 and stats["answered_ok"] == 1


def test_hang_until_the_client_gives_up(serve: Any) -> None:
    api, client = serve(hang_rate=1.0)
    with pytest.raises(httpx.ReadTimeout):
        post(client, body(), timeout=0.3)
    assert api.stats()["hung"] == 1
    started = time.monotonic()
    api.stop()  # a hung request must not hold up shutdown
    assert time.monotonic() - started < 1.5


def test_finite_hang_answers_after_hang_s(serve: Any) -> None:
    api, client = serve(hang_rate=1.0, hang_s=0.3)
    started = time.monotonic()
    response = post(client, body(), timeout=5)
    waited = time.monotonic() - started
    assert response.status_code == 200 and content(response)
    assert 0.3 <= waited < 2.0
    stats = api.stats()
    assert stats["hung"] == 1 and stats["answered_ok"] == 1


def test_finite_hang_still_ends_when_the_client_gives_up(serve: Any) -> None:
    api, client = serve(hang_rate=1.0, hang_s=30)
    with pytest.raises(httpx.ReadTimeout):
        post(client, body(), timeout=0.3)
    started = time.monotonic()
    api.stop()
    assert time.monotonic() - started < 1.5
    assert api.stats()["answered_ok"] == 0


def test_latency(serve: Any) -> None:
    _, client = serve(latency_ms=120, latency_jitter_ms=20)
    started = time.monotonic()
    assert post(client, body()).status_code == 200
    assert time.monotonic() - started >= 0.095


# ---------------------------------------------------------------- counters and lifecycle


def test_counters_and_body_hashes(serve: Any) -> None:
    api, client = serve()
    raws = [orjson.dumps(body("a")), orjson.dumps(body("b")), orjson.dumps(body("a"))]
    raws.append(raws[0])
    for raw in raws:
        assert client.post("/chat/completions", content=raw).status_code == 200
    post(client, body(top_p=5))
    stats = api.stats()
    assert stats["received"] == 5 and stats["answered_ok"] == 4
    assert stats["by_status"] == {200: 4, 400: 1}
    assert stats["ok_by_body_hash"] == {hashlib.sha256(raws[0]).hexdigest(): 3, hashlib.sha256(raws[1]).hexdigest(): 1}
    assert stats["duplicates"] == 2
    assert stats["prompt_tokens"] > 0 and stats["completion_tokens"] > 0 and stats["usd_spent"] > 0
    over_http = client.get(api.base_url.removesuffix("/v1") + "/_stats").json()
    assert over_http["by_status"] == {"200": 4, "400": 1}
    assert over_http["ok_by_body_hash"] == stats["ok_by_body_hash"]
    api.reset()
    assert api.stats()["received"] == 0 and api.stats()["ok_by_body_hash"] == {}
    post(client, body())
    assert client.post(api.base_url.removesuffix("/v1") + "/_reset").json() == {"ok": True}
    assert api.stats()["answered_ok"] == 0


def test_lifecycle() -> None:
    api = LocalAPI()
    with pytest.raises(RuntimeError):
        _ = api.base_url
    with api:
        url = api.base_url
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", url)
        assert api.start() == url
        assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 200
        busy = LocalAPI(port=int(url.rsplit(":", 1)[1].split("/")[0]))
        with pytest.raises(RuntimeError, match="could not start"):
            busy.start()
    api.stop()
    assert api.stats()["received"] == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_server_in_a_process(sig: signal.Signals) -> None:
    port = _free_port()
    code = (
        "from pipeline.localapi import ServerConfig, run_server\n"
        f"run_server(ServerConfig(), port={port}, ready=lambda url: print(url, flush=True))\n"
        "print('stopped', flush=True)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url == f"http://127.0.0.1:{port}/v1"
        assert httpx.get(url.removesuffix("/v1") + "/health").json() == {"status": "ok"}
        assert httpx.post(f"{url}/chat/completions", content=orjson.dumps(body())).status_code == 200
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.read().strip() == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_importing_does_not_load_polars() -> None:
    """``seedbatch serve`` and benchmark servers start fast: the package must not pull in polars/pyarrow."""
    code = "import sys, pipeline.localapi; print(sorted(m for m in ('polars', 'pyarrow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
