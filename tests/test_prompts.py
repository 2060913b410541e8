"""Rendering: rows → exact request bytes and the hash that names paid work."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.errors import SpecError
from pipeline.job.spec import JobSpec, spec_from_dict
from pipeline.records import Row, ToolCall
from pipeline.requests.prompts import (
    CHARS_PER_TOKEN,
    TOKENS_PER_MESSAGE,
    TOKENS_PER_REQUEST,
    Renderer,
    estimate_tokens,
    with_changes,
)
from pipeline.requests.templates import template_fields

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["pos", "neg"]}},
    "required": ["label"],
    "additionalProperties": False,
}


def make_spec(**sections: dict[str, Any]) -> JobSpec:
    data: dict[str, Any] = {"job": {"input": "in.csv", "output": "out.parquet"}, "prompt": {"user": "Say hi to {name}"}}
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return spec_from_dict(data, "t.toml")


def body_of(renderer: Renderer, values: dict[str, Any], key: str = "0", index: int = 0) -> dict[str, Any]:
    return orjson.loads(renderer.render(Row(index, key, values)).body)  # type: ignore[no-any-return]


# ----------------------------------------------------------------- template_fields


def test_template_fields_in_order_without_duplicates() -> None:
    assert template_fields("{b} and {a} then {b} {{literal}}", "w") == ["b", "a"]
    assert template_fields("no placeholders", "w") == []


def test_a_placeholder_is_the_column_name_verbatim() -> None:
    """Spaces and punctuation are part of the name: no format spec, attribute or index is ever parsed."""
    template = "{review text}|{a-b}|{x.y}|{q:1}|{it's}|{0}|{l[0]}|{n!r}"
    assert template_fields(template, "w") == ["review text", "a-b", "x.y", "q:1", "it's", "0", "l[0]", "n!r"]


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("{}", "empty placeholder '{}' at character 1"),
        ("{unclosed", "the '{' at character 1 is never closed"),
        ("stray }", "a single '}' at character 7"),
        ('like {"a": {"b": 1}}', "double them: {{ and }}"),
    ],
)
def test_template_fields_rejects(template: str, needle: str) -> None:
    with pytest.raises(SpecError) as info:
        template_fields(template, "prompt.user")
    assert str(info.value).startswith("prompt.user: ")
    assert needle in str(info.value)


def test_renderer_collects_fields_from_system_and_user() -> None:
    r = Renderer(make_spec(prompt={"system": "You grade {lang} for {name}", "user": "{name}: {text}"}))
    assert r.fields == ["name", "text", "lang"]


def test_missing_column_is_an_error_before_sending() -> None:
    r = Renderer(make_spec(prompt={"system": "Tone: {tone}", "user": "{name} {text}"}))
    r.check_columns(["name", "text", "tone"], "job")
    with pytest.raises(SpecError) as info:
        r.check_columns(["name", "other"], "jobs/x.toml: prompt")
    msg = str(info.value)
    assert msg.startswith("jobs/x.toml: prompt.user and prompt.system use column(s) ")
    assert "'text'" in msg
    assert "'tone'" in msg
    assert "'other'" in msg  # says what the input does have
    assert "\n" not in msg


def test_unknown_placeholder_names_the_closest_columns() -> None:
    r = Renderer(make_spec(prompt={"user": "{Reveiw Text} {prodcut} {zzz}"}))
    with pytest.raises(SpecError) as info:
        r.check_columns(["review text", "review_id", "product"], "jobs/x.toml: prompt")
    msg = str(info.value)
    assert "'Reveiw Text' (closest: 'review text')" in msg
    assert "'prodcut' (closest: 'product')" in msg
    assert "'zzz' not" in msg or "'zzz';" in msg or "'zzz' " in msg


# ----------------------------------------------------------------- render


def test_null_cells_render_empty_and_are_counted() -> None:
    r = Renderer(make_spec(prompt={"system": "About {topic}", "user": "{name}|{text}|{n}"}))
    req = r.render(Row(3, "k", {"name": None, "text": "x", "n": 0, "topic": None}))
    assert req.null_cells == 2
    msgs = orjson.loads(req.body)["messages"]
    assert msgs == [{"role": "system", "content": "About "}, {"role": "user", "content": "|x|0"}]
    assert (req.row_index, req.row_key) == (3, "k")
    # A missing key counts like a null.
    assert r.render(Row(0, "0", {"text": "x", "n": 1})).null_cells == 2


def test_values_are_not_reformatted() -> None:
    r = Renderer(make_spec(prompt={"user": "{name} {{kept}}"}))
    assert body_of(r, {"name": "{evil} {0}"})["messages"][-1]["content"] == "{evil} {0} {kept}"
    assert body_of(r, {"name": 1.5})["messages"][-1]["content"] == "1.5 {kept}"
    assert body_of(r, {"name": True})["messages"][-1]["content"] == "True {kept}"


def test_canonical_body_golden_bytes_and_hash() -> None:
    req = Renderer(make_spec()).render(Row(0, "0", {"name": "Ann"}))
    expected = (
        b'{"max_tokens":1024,"messages":[{"content":"Say hi to Ann","role":"user"}],'
        b'"model":"bytedance/dola-seed-2-0-lite"}'
    )
    assert req.body == expected
    assert req.request_hash == hashlib.blake2b(expected, digest_size=16).hexdigest()
    assert len(req.request_hash) == 32


def test_body_keys_sorted_at_every_level() -> None:
    spec = make_spec(output={"format": "json_schema", "schema": {"type": "object", "properties": {"z": {}, "a": {}}}})
    body = Renderer(spec, dict(spec.output.schema_)).render(Row(0, "0", {"name": "x"})).body  # type: ignore[arg-type]
    assert body == orjson.dumps(orjson.loads(body), option=orjson.OPT_SORT_KEYS)
    assert b" " not in body.replace(b"Say hi to x", b"")  # compact separators
    assert body.index(b'"a":{}') < body.index(b'"z":{}')


def test_hash_independent_of_dict_order() -> None:
    r = Renderer(make_spec(prompt={"user": "{a}{b}"}))
    one = r.render(Row(0, "0", {"a": "1", "b": "2"}))
    two = r.render(Row(0, "0", {"b": "2", "a": "1"}))
    assert one.body == two.body
    assert one.request_hash == two.request_hash
    # Spec key order does not matter either.
    s1 = make_spec(model={"temperature": 0.5, "seed": 7})
    s2 = make_spec(model={"seed": 7, "temperature": 0.5})
    row = Row(0, "0", {"name": "x"})
    assert Renderer(s1).render(row).request_hash == Renderer(s2).render(row).request_hash


def test_hash_stable_across_processes(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        from pipeline.requests.prompts import Renderer
        from pipeline.records import Row
        from pipeline.job.spec import spec_from_dict
        spec = spec_from_dict({"job": {"input": "in.csv", "output": "o.parquet"},
                               "prompt": {"system": "sys {name}", "user": "u {name} {x}"},
                               "model": {"temperature": 0.2, "seed": 3}})
        print(Renderer(spec).render(Row(0, "0", {"x": "y", "name": "Ann"})).request_hash)
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, check=True, timeout=60)
    spec = make_spec(prompt={"system": "sys {name}", "user": "u {name} {x}"}, model={"temperature": 0.2, "seed": 3})
    here = Renderer(spec).render(Row(0, "0", {"name": "Ann", "x": "y"})).request_hash
    assert out.stdout.decode().strip() == here


def test_hash_changes_with_prompt_model_and_params() -> None:
    row = Row(0, "0", {"name": "x"})
    hashes = {
        Renderer(make_spec()).render(row).request_hash,
        Renderer(make_spec(prompt={"user": "Say hello to {name}"})).render(row).request_hash,
        Renderer(make_spec(model={"name": "gpt-4o-mini"})).render(row).request_hash,
        Renderer(make_spec(model={"temperature": 0.0})).render(row).request_hash,
        Renderer(make_spec(model={"max_tokens": 10})).render(row).request_hash,
    }
    assert len(hashes) == 5


def test_dedupe_true_identical_rows_share_a_hash_dedupe_false_salts_with_key() -> None:
    plain = Renderer(make_spec())
    a = plain.render(Row(0, "0", {"name": "same"}))
    b = plain.render(Row(1, "1", {"name": "same"}))
    assert a.request_hash == b.request_hash

    salted = Renderer(make_spec(job={"dedupe": False}))
    c = salted.render(Row(0, "0", {"name": "same"}))
    d = salted.render(Row(1, "1", {"name": "same"}))
    assert c.body == d.body == a.body  # the bytes sent do not change, only the identity
    assert c.request_hash != d.request_hash
    assert c.request_hash != a.request_hash
    salt = hashlib.blake2b(c.body, digest_size=16)
    salt.update(b"\x00row:0")
    assert c.request_hash == salt.hexdigest()
    # The salt is the key, not the position: stable when rows move.
    assert salted.render(Row(9, "0", {"name": "same"})).request_hash == c.request_hash


def test_every_model_parameter_is_in_the_body() -> None:
    spec = make_spec(
        model={
            "name": "some/model",
            "max_tokens": 77,
            "temperature": 0.3,
            "top_p": 0.9,
            "seed": 42,
            "frequency_penalty": -0.5,
            "presence_penalty": 1.25,
            "reasoning_effort": "low",
        }
    )
    body = body_of(Renderer(spec), {"name": "x"})
    assert {k: v for k, v in body.items() if k != "messages"} == {
        "model": "some/model",
        "max_tokens": 77,
        "temperature": 0.3,
        "top_p": 0.9,
        "seed": 42,
        "frequency_penalty": -0.5,
        "presence_penalty": 1.25,
        "reasoning_effort": "low",
    }


def test_unset_parameters_are_left_out_but_zero_is_sent() -> None:
    body = body_of(Renderer(make_spec()), {"name": "x"})
    assert set(body) == {"model", "max_tokens", "messages"}
    body = body_of(Renderer(make_spec(model={"temperature": 0.0, "frequency_penalty": 0.0})), {"name": "x"})
    assert body["temperature"] == 0.0
    assert body["frequency_penalty"] == 0.0


# ----------------------------------------------------------------- response_format


def test_response_format_text_is_absent() -> None:
    assert "response_format" not in body_of(Renderer(make_spec(output={"format": "text"})), {"name": "x"})


def test_response_format_json_object() -> None:
    body = body_of(Renderer(make_spec(output={"format": "json_object"})), {"name": "x"})
    assert body["response_format"] == {"type": "json_object"}


def test_response_format_json_schema_dialect() -> None:
    spec = make_spec(output={"format": "json_schema", "schema": SCHEMA, "name": "verdict", "strict": False})
    assert spec.structured_output == "json_schema"
    body = body_of(Renderer(spec, SCHEMA), {"name": "x"})
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": False},
    }
    assert [m["role"] for m in body["messages"]] == ["user"]


def test_response_format_llamacpp_json_object_schema_dialect() -> None:
    spec = make_spec(output={"format": "json_schema", "schema": SCHEMA}, endpoint={"preset": "llamacpp"})
    assert spec.structured_output == "json_object_schema"
    body = body_of(Renderer(spec, SCHEMA), {"name": "x"})
    assert body["response_format"] == {"type": "json_object", "schema": SCHEMA}


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_response_format_instructions_dialect(system: str | None) -> None:
    spec = make_spec(
        prompt={"system": system, "user": "Say hi to {name}"},
        output={"format": "json_schema", "schema": SCHEMA},
        endpoint={"structured_output": "instructions"},
    )
    body = body_of(Renderer(spec, SCHEMA), {"name": "x"})
    assert "response_format" not in body
    first = body["messages"][0]
    assert first["role"] == "system"
    assert orjson.dumps(SCHEMA).decode() in first["content"]
    if system:
        assert first["content"].startswith("Be brief.\n\n")


def test_instructions_dialect_sends_no_response_format() -> None:
    spec = make_spec(output={"format": "json_schema", "schema": SCHEMA}, endpoint={"structured_output": "instructions"})
    assert "response_format" not in Renderer(spec, SCHEMA).params


# ----------------------------------------------------------------- few-shot, estimates, with_changes


def test_few_shot_between_system_and_user() -> None:
    spec = make_spec(
        prompt={
            "system": "Label {name}",
            "user": "Text: {name}",
            "few_shot": [
                {"role": "user", "content": "Text: {name} stays literal"},
                {"role": "assistant", "content": "pos"},
            ],
        }
    )
    msgs = body_of(Renderer(spec), {"name": "Bo"})["messages"]
    assert msgs == [
        {"role": "system", "content": "Label Bo"},
        {"role": "user", "content": "Text: {name} stays literal"},
        {"role": "assistant", "content": "pos"},
        {"role": "user", "content": "Text: Bo"},
    ]


def test_estimate_tokens_is_chars_over_four() -> None:
    assert CHARS_PER_TOKEN == 4.0
    assert estimate_tokens("") == 0
    assert estimate_tokens("a" * 400) == 100
    assert estimate_tokens("a" * 402) == 101  # rounds half up
    assert estimate_tokens("a" * 401) == 100


def test_est_prompt_tokens_tracks_text_length() -> None:
    spec = make_spec(prompt={"system": "S" * 40, "user": "{name}", "few_shot": [{"role": "user", "content": "F" * 80}]})
    r = Renderer(spec)
    req = r.render(Row(0, "0", {"name": "x" * 4000}))
    fixed = TOKENS_PER_REQUEST + TOKENS_PER_MESSAGE * 3 + 20
    assert req.est_prompt_tokens == fixed + (4000 + 40) // 4
    assert req.max_tokens == 1024
    short = r.render(Row(0, "0", {"name": ""})).est_prompt_tokens
    assert req.est_prompt_tokens - short == 1000


def test_with_changes_max_tokens_and_reask() -> None:
    body = Renderer(make_spec(model={"max_tokens": 100})).render(Row(0, "0", {"name": "x"})).body
    bigger = with_changes(body, max_tokens=200)
    assert orjson.loads(bigger)["max_tokens"] == 200
    assert orjson.loads(bigger)["messages"] == orjson.loads(body)["messages"]
    assert bigger == orjson.dumps(orjson.loads(bigger), option=orjson.OPT_SORT_KEYS)
    assert with_changes(body) == body

    reasked = orjson.loads(with_changes(body, reask=('{"label": 3}', "at $.label: 3 is not a string")))
    assert reasked["max_tokens"] == 100
    assert reasked["messages"][:-2] == orjson.loads(body)["messages"]
    assert reasked["messages"][-2] == {"role": "assistant", "content": '{"label": 3}'}
    assert reasked["messages"][-1]["role"] == "user"
    assert "at $.label: 3 is not a string" in reasked["messages"][-1]["content"]


def test_reask_of_a_bad_call_is_the_api_tool_conversation() -> None:
    """The bad call goes back as the assistant's tool_calls plus one tool message per call, which the
    reference (and the local API's validation of it) accepts."""
    from pipeline.localapi.validation import parse

    tools = [{"type": "function", "function": {"name": "label", "parameters": {"type": "object"}}}]
    forced = {"type": "function", "function": {"name": "label"}}
    body = orjson.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": tools, "tool_choice": forced}
    )
    calls = (ToolCall("call_a", "label", '{"label": "po'), ToolCall("call_b", "label", "{}"))
    data = orjson.loads(with_changes(body, reask_calls=(calls, "arguments of label are not valid JSON")))
    assistant, *answers = data["messages"][1:]
    assert assistant == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "label", "arguments": '{"label": "po'}},
            {"id": "call_b", "type": "function", "function": {"name": "label", "arguments": "{}"}},
        ],
    }
    assert [m["tool_call_id"] for m in answers] == ["call_a", "call_b"]
    assert all(m["role"] == "tool" and "not valid JSON" in m["content"] for m in answers)
    assert data["tools"] == tools and data["tool_choice"] == forced, "the functions are still offered"
    assert parse(data).forced == "label"
