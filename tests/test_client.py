"""Client: status codes onto the error tree, Retry-After, and the key never in a message."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest

from pipeline.errors import FatalAPIError, RetryableError, RowError
from pipeline.sending.client import (
    Client,
    RateLimits,
    parse_duration,
    parse_rate_limits,
    parse_retry_after,
    ratelimit_of,
)

KEY = "sk-test-SECRET-4242"
OK_BODY = {"id": "x", "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}], "usage": {}}


def client_for(handler: httpx.MockTransport) -> Client:
    return Client("http://api.test/v1", KEY, key_source="the key in $TEST_KEY", transport=handler)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def send_once(status: int, body: object = None, headers: dict[str, str] | None = None) -> object:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == f"Bearer {KEY}"
        assert request.url.path == "/v1/chat/completions"
        return httpx.Response(
            status, json=body if body is not None else {"error": {"message": "nope"}}, headers=headers
        )

    client = client_for(httpx.MockTransport(handler))
    try:
        return await client.send(b"{}")
    finally:
        await client.aclose()


def test_200_decodes() -> None:
    reply = run(send_once(200, OK_BODY))
    assert reply.data["id"] == "x"  # type: ignore[attr-defined]


@pytest.mark.parametrize("status", [401, 403, 404])
def test_fatal_statuses(status: int) -> None:
    with pytest.raises(FatalAPIError) as info:
        run(send_once(status, {"error": {"message": f"Incorrect API key provided: {KEY}"}}))
    assert KEY not in str(info.value)
    if status != 404:
        assert "$TEST_KEY" in str(info.value)


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
def test_retryable_statuses(status: int) -> None:
    with pytest.raises(RetryableError) as info:
        run(send_once(status, headers={"retry-after": "3"}))
    assert info.value.status_code == status
    assert info.value.retry_after == 3.0


@pytest.mark.parametrize("status", [400, 413, 422])
def test_row_errors(status: int) -> None:
    with pytest.raises(RowError, match=f"HTTP {status}: nope"):
        run(send_once(status))


@pytest.mark.parametrize("status", [400, 503])
def test_http_errors_keep_the_servers_error_object_and_request_id(status: int) -> None:
    said = {"message": f"Invalid value for temperature (key {KEY})", "type": "invalid_request_error",
            "param": "temperature", "code": "invalid_value", "extra": [1]}  # fmt: skip
    with pytest.raises((RowError, RetryableError)) as info:
        run(send_once(status, {"error": said}, headers={"x-request-id": "req_abc"}))
    assert info.value.request_id == "req_abc"
    assert info.value.server_error is not None and KEY not in info.value.server_error
    assert json.loads(info.value.server_error) == {**said, "message": "Invalid value for temperature (key ***)"}
    with pytest.raises(RowError) as plain:  # a body that is not an error object: nothing to keep
        run(send_once(400, ["not", "an", "object"]))
    assert plain.value.server_error is None and plain.value.request_id is None


def test_replies_carry_the_request_id_and_the_body_they_answer() -> None:
    reply = run(send_once(200, OK_BODY, headers={"x-request-id": "req_1"}))
    assert reply.request_id == "req_1"  # type: ignore[attr-defined]
    assert reply.sent == b"{}"  # type: ignore[attr-defined]


def test_non_json_200_is_retryable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"<html>gateway</html>")

    async def go() -> None:
        client = client_for(httpx.MockTransport(handler))
        with pytest.raises(RetryableError, match="not JSON"):
            await client.send(b"{}")
        await client.aclose()

    run(go())


def test_connect_error_is_not_sent_and_read_error_is() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    def drop(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("peer closed", request=request)

    async def go() -> None:
        for handler, sent in ((refuse, False), (drop, True)):
            client = client_for(httpx.MockTransport(handler))
            with pytest.raises(RetryableError) as info:
                await client.send(b"{}")
            assert info.value.sent is sent
            await client.aclose()

    run(go())


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "nan", "retry-after": "4"}, 4.0),
        ({"retry-after": "-3"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, 10.0),
        ({"retry-after": "100000"}, 600.0),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    now = 1445412480.0  # 07:28:00 GMT that day
    got = parse_retry_after(httpx.Headers(headers), now=now)
    if expected is None:
        assert got is None
    else:
        assert got is not None and math.isclose(got, expected)


def test_llamacpp_request_validation_500_is_a_row_error() -> None:
    # llama-cpp-python 0.3.x's answer to response_format {"type": "json_schema", ...}: a 500, not a 422.
    message = (
        "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
        "'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema'}\n\n"
        '  File "llama_cpp/server/app.py", line 376, in create_chat_completion\n    POST /v1/chat/completions'
    )
    body = {"error": {"message": message, "type": "internal_server_error", "param": None, "code": None}}
    with pytest.raises(RowError, match="Input should be 'text' or 'json_object'") as info:
        run(send_once(500, body))
    assert info.value.kind == "http_500_invalid_request"
    with pytest.raises(RetryableError):  # any other 500 is still the server's fault
        run(send_once(500, {"error": {"message": "CUDA out of memory", "type": "internal_server_error"}}))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("20ms", 0.02),
        ("1.5s", 1.5),
        ("6m0s", 360.0),
        ("1h2m3s", 3723.0),
        ("2m30.5s", 150.5),
        ("0s", 0.0),
        ("7", 7.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("5x", None),
        ("1.5s junk", None),
        ("-3s", None),
        ("nan", None),
    ],
)
def test_parse_duration(raw: str | None, expected: float | None) -> None:
    got = parse_duration(raw)
    if expected is None:
        assert got is None
    else:
        assert got is not None and math.isclose(got, expected)


def test_parse_rate_limits_reads_all_six_and_none_when_absent() -> None:
    headers = {
        "x-ratelimit-limit-requests": "3000",
        "x-ratelimit-remaining-requests": "2999",
        "x-ratelimit-reset-requests": "20ms",
        "x-ratelimit-limit-tokens": "250000",
        "x-ratelimit-remaining-tokens": "garbage",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert parse_rate_limits(httpx.Headers(headers)) == RateLimits(3000, 2999, 0.02, 250000, None, 360.0)
    assert parse_rate_limits(httpx.Headers({"x-ratelimit-limit-requests": "many"})) is None
    assert parse_rate_limits(httpx.Headers({})) is None


LIMIT_HEADERS = {"x-ratelimit-limit-requests": "3000", "x-ratelimit-reset-requests": "1.5s"}


def test_rate_limits_ride_on_replies_and_errors() -> None:
    reply = run(send_once(200, OK_BODY, headers=LIMIT_HEADERS))
    assert reply.ratelimit == RateLimits(limit_requests=3000, reset_requests_s=1.5)  # type: ignore[attr-defined]
    assert run(send_once(200, OK_BODY)).ratelimit is None  # type: ignore[attr-defined]
    with pytest.raises(RetryableError) as info:
        run(send_once(429, headers={**LIMIT_HEADERS, "retry-after": "2"}))
    assert info.value.retry_after == 2.0
    assert ratelimit_of(info.value) == RateLimits(limit_requests=3000, reset_requests_s=1.5)
    assert ratelimit_of(RetryableError("timeout", kind="timeout")) is None


def test_per_call_timeout_is_a_retryable_timeout_and_capped_by_the_client() -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, json=OK_BODY)

    async def go() -> None:
        client = Client("http://api.test/v1", KEY, timeout_s=0.2, transport=httpx.MockTransport(slow))
        with pytest.raises(RetryableError, match=r"within 0\.05s") as info:
            await client.send(b"{}", timeout_s=0.05)
        assert info.value.kind == "timeout" and info.value.sent
        with pytest.raises(RetryableError, match=r"within 0\.2s"):  # asking for more than the cap gets the cap
            await client.send(b"{}", timeout_s=30)
        await client.aclose()

    run(go())


def sse(*chunks: object, done: bool = True) -> bytes:
    lines = [b": keep-alive\n\n"]
    lines += [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks]
    if done:
        lines.append(b"data: [DONE]\n\n")
    return b"".join(lines)


STREAM = [
    {"id": "s1", "model": "m", "created": 1, "choices": [{"index": 0, "delta": {"role": "assistant"}}]},
    {"id": "s1", "choices": [{"index": 0, "delta": {"reasoning_content": "think "}}]},
    {"id": "s1", "choices": [{"index": 0, "delta": {"reasoning_content": "more"}}]},
    {"id": "s1", "choices": [{"index": 0, "delta": {"content": '{"label": '}}]},
    {"id": "s1", "choices": [{"index": 0, "delta": {"content": '"pos"}'}, "finish_reason": "stop"}]},
    {
        "id": "s1",
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        "meta": {"usage": {"credits_used": 42}},
    },
]


def stream_client(handler) -> Client:  # type: ignore[no-untyped-def]
    return Client("http://api.test/v1", KEY, transport=httpx.MockTransport(handler))


def test_stream_is_asked_for_and_reassembled_into_a_plain_answer() -> None:
    seen: dict[str, object] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(json.loads(request.content))
        # Split mid-line, as a network would.
        body = sse(*STREAM)
        parts = [body[i : i + 37] for i in range(0, len(body), 37)]
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream", **LIMIT_HEADERS},
            content=_chunks(parts),
        )

    async def go() -> None:
        client = stream_client(handler)
        reply = await client.send(json.dumps({"model": "m", "messages": []}).encode(), stream=True)
        await client.aclose()
        assert seen["stream"] is True and seen["stream_options"] == {"include_usage": True}
        assert reply.data == {
            "id": "s1",
            "model": "m",
            "created": 1,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": '{"label": "pos"}', "reasoning_content": "think more"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
            "meta": {"usage": {"credits_used": 42}},
        }
        assert reply.ratelimit == RateLimits(limit_requests=3000, reset_requests_s=1.5)

    run(go())


async def _chunks(parts: list[bytes]):  # type: ignore[no-untyped-def]
    for part in parts:
        yield part


def test_stream_stall_is_retryable() -> None:
    async def stalls():  # type: ignore[no-untyped-def]
        yield sse(STREAM[0], done=False)
        await asyncio.sleep(10)
        yield b""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stalls())

    async def go() -> None:
        client = stream_client(handler)
        with pytest.raises(RetryableError, match="stalled") as info:
            await client.send(b"{}", stream=True, stall_s=0.05)
        assert info.value.kind == "stall" and info.value.sent
        await client.aclose()

    run(go())


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (sse(*STREAM[:3], done=False), "ended before"),  # dropped mid-answer
        (sse({"error": {"message": "overloaded"}}), "overloaded"),
        (b"data: {not json\n\n", "not JSON"),
        (sse(done=True), "without choices"),
    ],
)
def test_broken_streams_are_retryable(body: bytes, match: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    async def go() -> None:
        client = stream_client(handler)
        with pytest.raises(RetryableError, match=match):
            await client.send(b"{}", stream=True)
        await client.aclose()

    run(go())


def test_stream_asked_but_a_plain_json_answer_still_decodes() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=OK_BODY)

    async def go() -> None:
        client = stream_client(handler)
        reply = await client.send(b"{}", stream=True)
        await client.aclose()
        assert reply.data == OK_BODY

    run(go())


def test_https_servers_are_verified_plain_http_skips_the_ca_bundle() -> None:
    import ssl

    secure = Client("https://api.example.com/v1", "k")
    plain = Client("http://127.0.0.1:8080/v1", None)
    assert secure._transport.ssl_context.verify_mode == ssl.CERT_REQUIRED  # type: ignore[attr-defined]
    assert secure._transport.ssl_context.check_hostname  # type: ignore[attr-defined]
    assert plain._transport.ssl_context.verify_mode == ssl.CERT_NONE  # type: ignore[attr-defined]
