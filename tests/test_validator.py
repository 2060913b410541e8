"""Judging 200 answers: usage, fences, refusals, truncation, JSON and schema."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from pipeline.answers.validator import CallRules, judge, parse_document, parse_usage, request_rules, strip_fence
from pipeline.job.schema_types import compile_validator
from pipeline.records import Reply, ToolCall, Usage

#: The reference's example response (shared/api/dola-seed-2.0-lite.md), content shortened.
REFERENCE: dict[str, Any] = {
    "choices": [
        {
            "finish_reason": "stop",
            "index": 0,
            "logprobs": None,
            "message": {
                "content": "Mankind feels like one of the most fascinating...",
                "reasoning_content": "\nGot it, let's tackle this question...",
                "role": "assistant",
            },
        }
    ],
    "created": 1777553738,
    "id": "021777553714446312d4ce6e0ff480f3ded581ca0cd03edacda38",
    "model": "seed-2-0-lite-260228",
    "service_tier": "default",
    "object": "chat.completion",
    "usage": {
        "completion_tokens": 1272,
        "prompt_tokens": 57,
        "total_tokens": 1329,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 877},
    },
    "meta": {"usage": {"credits_used": 6653, "usd_spent": 0.0033265}},
}

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["pos", "neg"]}, "score": {"type": "number"}},
    "required": ["label", "score"],
    "additionalProperties": False,
}


def reply(content: Any = "hi", finish: str | None = "stop", **message: Any) -> Reply:
    data = copy.deepcopy(REFERENCE)
    data["choices"][0]["message"] = {"role": "assistant", "content": content, **message}
    data["choices"][0]["finish_reason"] = finish
    return Reply(data=data, latency_ms=5.0)


# ----------------------------------------------------------------- usage


def test_parse_usage_reference_example() -> None:
    assert parse_usage(REFERENCE) == Usage(
        prompt_tokens=57,
        completion_tokens=1272,
        total_tokens=1329,
        reasoning_tokens=877,
        cached_tokens=0,
        credits_used=6653.0,
        usd_spent=0.0033265,
    )


def test_parse_usage_overview_example_with_null_details() -> None:
    data = {
        "usage": {
            "prompt_tokens": 137,
            "completion_tokens": 914,
            "total_tokens": 1051,
            "completion_tokens_details": None,
            "prompt_tokens_details": None,
        },
        "meta": {"usage": {"credits_used": 120000, "usd_spent": 0.06}},
    }
    assert parse_usage(data) == Usage(137, 914, 1051, None, None, 120000.0, 0.06)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, Usage()),
        ({"usage": None, "meta": None}, Usage()),
        ({"usage": "junk", "meta": "junk"}, Usage()),
        ({"usage": {"prompt_tokens": 5}}, Usage(prompt_tokens=5)),
        # total derived only when both parts are known
        ({"usage": {"prompt_tokens": 5, "completion_tokens": 7}}, Usage(5, 7, 12)),
        ({"usage": {"prompt_tokens": 5.0, "completion_tokens": 7.0, "total_tokens": 12.0}}, Usage(5, 7, 12)),
        ({"usage": {"prompt_tokens": True, "completion_tokens": "7"}}, Usage()),  # bool/str are not counts
        ({"meta": {"usage": {"usd_spent": 0.5}}}, Usage(usd_spent=0.5)),
        ({"meta": {"usage": {"credits_used": 10}}}, Usage(credits_used=10.0)),
        ({"meta": {"usage": None}}, Usage()),
        ({"usage": {"prompt_tokens_details": "x", "completion_tokens_details": []}}, Usage()),
    ],
)
def test_parse_usage_missing_and_odd_fields(data: dict[str, Any], expected: Usage) -> None:
    assert parse_usage(data) == expected


# ----------------------------------------------------------------- fences


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('```json\n{"a": 1}\n```', '{"a": 1}'),
        ('```JSON\n{"a": 1}\n```', '{"a": 1}'),
        ('```\n{"a": 1}\n```', '{"a": 1}'),
        ('  \n```json\n{"a": 1}```  \n', '{"a": 1}'),
        ('```json\n{"a":\n 1}\n```', '{"a":\n 1}'),
        ('{"a": 1}', '{"a": 1}'),
        ('prefix ```json\n{"a": 1}\n```', 'prefix ```json\n{"a": 1}\n```'),  # only a whole-answer fence
        ("```python\nx = 1\n```", "```python\nx = 1\n```"),
    ],
)
def test_strip_fence(text: str, expected: str) -> None:
    assert strip_fence(text) == expected


def test_parse_document() -> None:
    assert parse_document('```json\n{"a": [1, 2]}\n```') == {"a": [1, 2]}
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_document("{'a': 1}")


# ----------------------------------------------------------------- judge


def test_reference_reply_is_ok_and_keeps_fields() -> None:
    j = judge(Reply(REFERENCE, 1.0), expects_json=False, check=None)
    assert j.status == "ok"
    assert j.error is None
    assert j.content == REFERENCE["choices"][0]["message"]["content"]
    assert j.reasoning_content == REFERENCE["choices"][0]["message"]["reasoning_content"]
    assert j.finish_reason == "stop"
    assert j.model == "seed-2-0-lite-260228"
    assert j.response_id == REFERENCE["id"]
    assert j.usage == parse_usage(REFERENCE)


@pytest.mark.parametrize("expects_json", [False, True])
def test_refusal_is_refused(expects_json: bool) -> None:
    j = judge(reply(None, refusal="  I can't help with that.  "), expects_json=expects_json, check=None)
    assert j.status == "refused"
    assert j.error == "model refused: I can't help with that."
    assert j.usage.prompt_tokens == 57  # a refusal is still paid for


def test_blank_refusal_is_not_a_refusal() -> None:
    assert judge(reply("fine", refusal="  "), expects_json=False, check=None).status == "ok"
    assert judge(reply("fine", refusal=None), expects_json=False, check=None).status == "ok"


@pytest.mark.parametrize("expects_json", [False, True])
def test_content_filter_is_refused(expects_json: bool) -> None:
    j = judge(reply('{"label": "pos"}', finish="content_filter"), expects_json=expects_json, check=None)
    assert j.status == "refused"
    assert j.error is not None
    assert "content filter" in j.error
    assert j.finish_reason == "content_filter"


def test_length_on_json_job_is_truncated() -> None:
    j = judge(reply('{"label": "po', finish="length"), expects_json=True, check=None)
    assert j.status == "truncated"
    assert j.error is not None
    assert "max_tokens" in j.error
    assert j.content == '{"label": "po'  # kept for inspection


def test_length_on_text_job_is_ok() -> None:
    j = judge(reply("A long answer that was cut", finish="length"), expects_json=False, check=None)
    assert j.status == "ok"
    assert j.finish_reason == "length"


def test_no_content_is_invalid_output() -> None:
    for expects_json in (False, True):
        j = judge(reply(None), expects_json=expects_json, check=None)
        assert (j.status, j.error) == ("invalid_output", "answer has no content")


def test_content_parts_are_joined() -> None:
    parts = [{"type": "text", "text": '{"label": '}, {"type": "text", "text": '"pos", "score": 1}'}, "junk"]
    j = judge(reply(parts), expects_json=True, check=compile_validator(SCHEMA))
    assert j.status == "ok"
    assert j.content == '{"label": "pos", "score": 1}'


def test_invalid_json() -> None:
    j = judge(reply("Sure! Here is the JSON: {label: pos}"), expects_json=True, check=None)
    assert j.status == "invalid_output"
    assert j.error is not None
    assert j.error.startswith("answer is not valid JSON (")


@pytest.mark.parametrize(
    ("content", "kind"), [("[1, 2]", "list"), ('"pos"', "str"), ("3", "int"), ("null", "NoneType")]
)
def test_non_object_json(content: str, kind: str) -> None:
    j = judge(reply(content), expects_json=True, check=None)
    assert j.status == "invalid_output"
    assert j.error == f"answer is JSON but not an object ({kind})"


def test_fenced_json_is_accepted_and_content_is_the_document() -> None:
    """An ok row's content loads with json.loads: the fence is dropped, the document kept as written."""
    text = '```json\n{"label": "neg", "score": 0.1}\n```'
    j = judge(reply(text), expects_json=True, check=compile_validator(SCHEMA))
    assert j.status == "ok"
    assert j.content == '{"label": "neg", "score": 0.1}'
    assert json.loads(j.content) == {"label": "neg", "score": 0.1}


def test_a_raw_newline_inside_a_string_is_accepted_and_content_rewritten_as_strict_json() -> None:
    """llama.cpp's bounded-string grammar lets a model write a raw newline inside a string."""
    text = '{"label": "neg", "score": 0.1, "note": "line one\nline two"}'.replace("\\n", "\n")
    schema = {**SCHEMA, "properties": {**SCHEMA["properties"], "note": {"type": "string"}}}
    j = judge(reply(text), expects_json=True, check=compile_validator(schema))
    assert j.status == "ok", j.error
    assert json.loads(j.content)["note"] == "line one\nline two"


def test_rejected_fenced_answer_keeps_its_raw_text() -> None:
    text = '```json\n{"label": "maybe", "score": 0.1}\n```'
    j = judge(reply(text), expects_json=True, check=compile_validator(SCHEMA))
    assert j.status == "invalid_output"
    assert j.content == text


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"label": "meh", "score": 1}', "at $.label: 'meh' is not one of ['pos', 'neg']"),
        ('{"label": "pos"}', "'score' is a required property"),
        ('{"label": "pos", "score": "high"}', "at $.score: 'high' is not of type 'number'"),
        ('{"label": "pos", "score": 1, "x": 0}', "Additional properties are not allowed"),
    ],
)
def test_schema_mismatch_message(content: str, needle: str) -> None:
    j = judge(reply(content), expects_json=True, check=compile_validator(SCHEMA))
    assert j.status == "invalid_output"
    assert j.error is not None
    assert j.error.startswith("answer did not match schema at $")
    assert needle in j.error
    assert "\n" not in j.error


def test_schema_not_checked_for_text_jobs() -> None:
    def check(doc: object) -> str | None:
        raise AssertionError("text answers are never schema-checked")

    assert judge(reply("not json"), expects_json=False, check=check).status == "ok"


def test_odd_top_level_types_are_ignored() -> None:
    data = copy.deepcopy(REFERENCE)
    data["model"] = 5
    data["id"] = None
    data["choices"][0]["message"]["reasoning_content"] = {"x": 1}
    data["choices"][0]["finish_reason"] = 3
    j = judge(Reply(data, 1.0), expects_json=False, check=None)
    assert (j.model, j.response_id, j.reasoning_content, j.finish_reason) == (None, None, None, None)
    assert j.status == "ok"


# ----------------------------------------------------------------- function calls


def call(name: str, arguments: str, ident: str = "call_1") -> dict[str, Any]:
    return {"id": ident, "type": "function", "function": {"name": name, "arguments": arguments}}


def judge_calls(r: Reply, rules: CallRules) -> Any:
    return judge(r, expects_json=False, check=compile_validator(SCHEMA), calls=rules)


def test_forced_call_arguments_become_the_content() -> None:
    j = judge_calls(reply(None, "tool_calls", tool_calls=[call("label", '{"label": "pos", "score": 1}')]),
                    CallRules(forced="label"))  # fmt: skip
    assert j.status == "ok"
    assert json.loads(j.content) == {"label": "pos", "score": 1}
    assert j.tool_calls == (ToolCall("call_1", "label", '{"label": "pos", "score": 1}'),)


@pytest.mark.parametrize(
    ("tool_calls", "finish", "status", "error"),
    [
        ([call("label", '{"label": "pos"')], "tool_calls", "invalid_output", "arguments of label are not valid JSON"),
        ([call("label", '{"label": "maybe", "score": 1}')], "tool_calls", "invalid_output", "at $.label"),
        ([call("label", "[1]")], "tool_calls", "invalid_output", "not an object"),
        ([call("other", "{}")], "tool_calls", "invalid_output", "called 'other', not label"),
        (None, "stop", "invalid_output", "called no function, not label"),
        ([call("label", '{"label": "p')], "length", "truncated", "max_tokens"),
    ],
)
def test_forced_call_problems(tool_calls: Any, finish: str, status: str, error: str) -> None:
    r = reply("some text" if tool_calls is None else None, finish, **({"tool_calls": tool_calls} if tool_calls else {}))
    j = judge_calls(r, CallRules(forced="label"))
    assert j.status == status
    assert error in (j.error or ""), j.error


def test_unforced_calls_are_each_checked_against_their_own_parameters() -> None:
    rules = CallRules(checks={"label": compile_validator(SCHEMA), "ping": None})
    two = [call("ping", "{}"), call("label", '{"label":"neg","score":0}')]
    ok = judge_calls(reply(None, "tool_calls", tool_calls=two), rules)
    assert ok.status == "ok" and ok.content is None and ok.tool_calls is not None and len(ok.tool_calls) == 2
    bad = judge_calls(reply(None, "tool_calls", tool_calls=[call("ping", "{}"), call("label", '{"score": 0}')]), rules)
    assert bad.status == "invalid_output" and "arguments of label did not match its parameters" in (bad.error or "")
    unknown = judge_calls(reply(None, "tool_calls", tool_calls=[call("pong", "{}")]), rules)
    assert unknown.status == "invalid_output" and "'pong'" in (unknown.error or "")
    assert judge_calls(reply("plain text"), rules).status == "ok", "auto: a text answer is fine"
    required = judge_calls(reply("plain text"), CallRules(checks=rules.checks, required=True))
    assert required.status == "invalid_output" and "required" in (required.error or "")


# ----------------------------------------------------------------- a request's own functions (Batch lines)

LABEL_FN = {"name": "label", "parameters": {"type": "object", "properties": {"label": {"type": "string"}},
                                             "required": ["label"], "additionalProperties": False}}  # fmt: skip
OTHER_FN = {"name": "other", "parameters": {"type": "object"}}


def sent(tool_choice: Any = None, tools: Any = None) -> bytes:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": 'say "tools"'}]}
    body["tools"] = tools if tools is not None else [{"type": "function", "function": f} for f in (LABEL_FN, OTHER_FN)]
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    return json.dumps(body).encode()


def calling(body: bytes, *calls: tuple[str, str], content: Any = None) -> Reply:
    made = [
        {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": a}} for i, (n, a) in enumerate(calls)
    ]
    r = reply(content, "tool_calls" if calls else "stop", tool_calls=made, refusal=None)
    return Reply(r.data, r.latency_ms, request_id="req_9", sent=body)


def text_judge(r: Reply) -> Any:
    return judge(r, expects_json=False, check=None)


def test_request_rules_come_from_the_body_sent() -> None:
    assert request_rules(None) is None
    assert request_rules(b'{"messages": [{"role": "user", "content": "the \\"tools\\" word"}]}') is None
    auto = request_rules(sent())
    assert auto is not None and set(auto.checks) == {"label", "other"} and not auto.required
    forced = request_rules(sent({"type": "function", "function": {"name": "label"}}))
    assert forced is not None and set(forced.checks) == {"label"} and forced.required
    required = request_rules(sent("required"))
    assert required is not None and required.required
    assert request_rules(sent("none")) is None


def test_a_call_answers_a_request_that_offered_functions() -> None:
    j = text_judge(calling(sent(), ("label", '{"label": "pos"}')))
    assert (j.status, j.content, j.error) == ("ok", None, None)  # a call is an answer: no "no content"
    assert j.tool_calls == (ToolCall("c0", "label", '{"label": "pos"}'),)
    assert (j.created, j.request_id) == (REFERENCE["created"], "req_9")


def test_a_forced_call_is_checked_against_the_lines_own_functions() -> None:
    forced = sent({"type": "function", "function": {"name": "label"}})
    assert text_judge(calling(forced, ("label", '{"label": "pos"}'))).status == "ok"
    bad = text_judge(calling(forced, ("label", '{"score": 1}')))
    assert bad.status == "invalid_output" and "arguments of label did not match its parameters" in (bad.error or "")
    other = text_judge(calling(forced, ("other", "{}")))
    assert other.status == "invalid_output" and "'other'" in (other.error or "")
    no_call = text_judge(calling(forced, content="a text answer"))
    assert no_call.status == "invalid_output" and "called no function" in (no_call.error or "")
    assert text_judge(calling(sent("auto"), content="a text answer")).status == "ok"  # auto may answer in text


def test_refusal_and_created_are_kept_as_sent() -> None:
    j = text_judge(reply(None, refusal="I can't help with that."))
    assert (j.status, j.refusal, j.created) == ("refused", "I can't help with that.", REFERENCE["created"])
