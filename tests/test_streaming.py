"""``endpoint.stream``: answers as server-sent events from the local API, put back together by the client.

What a user relies on: a streamed run writes the same output as a plain one (content, reasoning, usage,
cost), and a stream that goes quiet is abandoned after ``stall_s`` and sent again, however long the
answer has been running, so every row still ends ok.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import polars as pl
import pytest

from pipeline.errors import RetryableError
from pipeline.localapi import LocalAPI, ServerConfig
from pipeline.localapi.streaming import events
from pipeline.sending.client import Client
from pipeline.sending.sse import next_piece
from tests.helpers import make_spec, run

COMPARED = [
    "review_id",
    "status",
    "content",
    "reasoning_content",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "usd_spent",
]


def _output(spec_path: Path) -> pl.DataFrame:
    return pl.read_parquet(spec_path).select(COMPARED).sort("review_id")


def test_streamed_run_writes_the_same_output_as_a_plain_one(tmp_path: Path, api: LocalAPI) -> None:
    sections = {"model": {"max_tokens": 200, "reasoning_effort": "low"}}
    plain = make_spec(tmp_path / "plain", api, n=40, **sections)
    run(plain)
    received_plain = api.stats()["received"]
    streamed = make_spec(tmp_path / "streamed", api, n=40, endpoint={"stream": True}, **sections)
    summary = run(streamed)

    assert summary.rows_by_status == {"ok": 40}
    assert api.stats()["received"] - received_plain == 40
    a, b = _output(plain.job.output), _output(streamed.job.output)
    assert a.get_column("reasoning_content").null_count() == 0  # the comparison covers reasoning too
    assert a.equals(b)


def test_a_stalled_stream_is_abandoned_and_sent_again(tmp_path: Path, api: LocalAPI) -> None:
    # One stream in four stops after its first chunk and never continues; plain requests would wait for the
    # observed-latency deadline (at least 10 s), a stream is given up after stall_s of silence.
    api.config = ServerConfig(hang_rate=0.25, hang_s=None, seed=3)
    api.reset()  # the faults start afresh from this seed
    spec = make_spec(tmp_path, api, n=40, endpoint={"stream": True, "stall_s": 0.3})
    summary = run(spec)
    out = pl.read_parquet(spec.job.output)

    assert out.get_column("status").to_list() == ["ok"] * 40
    assert api.stats()["hung"] >= 4, "too few stalls to prove anything"
    assert summary.retries >= api.stats()["hung"]
    assert summary.errors_by_kind.get("stall", 0) >= api.stats()["hung"]


def test_the_local_api_stream_reassembles_to_its_plain_answer(api: LocalAPI) -> None:
    body = {
        "model": "bytedance/dola-seed-2-0-lite",
        "messages": [{"role": "user", "content": "Label: a fine kettle"}],
        "reasoning_effort": "medium",
        "max_tokens": 300,
    }
    with httpx.Client() as http:
        plain = http.post(f"{api.base_url}/chat/completions", json=body).json()
        raw = http.post(
            f"{api.base_url}/chat/completions",
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
        )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.endswith("data: [DONE]\n\n")

    async def reassemble() -> dict[str, object]:
        transport = httpx.MockTransport(
            lambda request: httpx.Response(200, headers={"content-type": "text/event-stream"}, content=raw.content)
        )
        client = Client("http://127.0.0.1:1/v1", None, transport=transport)
        reply = await client.send(orjson.dumps(body), stream=True)
        return reply.data

    data = asyncio.run(reassemble())
    assert data["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]  # type: ignore[index]
    assert data["choices"][0]["message"]["reasoning_content"] == plain["choices"][0]["message"]["reasoning_content"]  # type: ignore[index]
    assert data["usage"] == plain["usage"]
    assert data["meta"] == plain["meta"]


def test_stream_options_without_stream_is_a_400(api: LocalAPI) -> None:
    body = {
        "model": "bytedance/dola-seed-2-0-lite",
        "messages": [{"role": "user", "content": "x"}],
        "stream_options": {"include_usage": True},
    }
    answer = httpx.post(f"{api.base_url}/chat/completions", json=body)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "stream_options"


def test_streamed_tool_call_fragments_are_joined() -> None:
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
                        ]
                    },
                }
            ]
        },
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": '}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ]
    content = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"

    async def go() -> dict[str, object]:
        transport = httpx.MockTransport(
            lambda request: httpx.Response(200, headers={"content-type": "text/event-stream"}, content=content)
        )
        reply = await Client("http://x/v1", None, transport=transport).send(b'{"messages": []}', stream=True)
        return reply.data

    message = asyncio.run(go())["choices"][0]["message"]  # type: ignore[index]
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]


def test_a_stream_cut_before_its_end_is_retryable() -> None:
    whole = events(
        {
            "id": "x",
            "model": "m",
            "choices": [{"index": 0, "message": {"content": "hello there"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        },
        include_usage=True,
    )
    cut = b"".join(whole[:2])  # role and the first piece of content, then the connection ends

    async def go() -> None:
        transport = httpx.MockTransport(
            lambda request: httpx.Response(200, headers={"content-type": "text/event-stream"}, content=cut)
        )
        await Client("http://x/v1", None, transport=transport).send(b'{"messages": []}', stream=True)

    with pytest.raises(RetryableError) as err:
        asyncio.run(go())
    assert err.value.kind == "connection"


def test_a_stream_may_be_silent_for_the_learned_deadline_at_most() -> None:
    from pipeline.executors.local import streaming_send
    from pipeline.records import Reply

    learned = [600.0]
    limits: list[float] = []

    class Recording:
        async def send(self, body: bytes, timeout_s: float | None, *, stream: bool, stall_s: object) -> Reply:
            assert stream and timeout_s is None  # the whole answer is never timed, only its silences
            assert callable(stall_s)
            limits.append(stall_s())
            learned[0] = 12.0  # learned while the stream is open: the stream's limit follows
            limits.append(stall_s())
            return Reply(data={}, latency_ms=1.0)

    send = streaming_send(Recording(), 30.0, lambda: learned[0])  # type: ignore[arg-type]
    asyncio.run(send(b"{}", None))
    assert limits == [30.0, 12.0]


def test_a_silent_stream_is_cut_by_a_limit_learned_while_it_waits() -> None:
    async def go() -> float:
        async def pieces() -> AsyncIterator[bytes]:
            yield b"data: {}\n\n"
            await asyncio.sleep(60)
            yield b"never"

        limit = [30.0]
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, lambda: limit.__setitem__(0, 0.3))
        started = loop.time()
        with pytest.raises(RetryableError) as err:
            await next_piece(_after_first(pieces()), lambda: limit[0])
        assert err.value.kind == "stall"
        return loop.time() - started

    assert asyncio.run(go()) < 2.0


async def _after_first(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    await anext(chunks)
    async for piece in chunks:
        yield piece


def test_a_streamed_forced_function_call_writes_the_same_output(tmp_path: Path, api: LocalAPI) -> None:
    tools = str(Path(__file__).resolve().parent.parent / "jobs" / "tools" / "invoice_tools.json")
    frame = pl.DataFrame(
        {
            "review_id": [f"i-{i}" for i in range(12)],
            "text": [f"Invoice {i} from Acme, total 1{i}.50 EUR" for i in range(12)],
        }
    )
    sections = {
        "model": {"max_tokens": 1024, "tools": tools, "tool_choice": "record_invoice"},
        "prompt": {"system": "Record the invoice.", "user": "{text}"},
    }
    plain = make_spec(tmp_path / "plain", api, frame, **sections)
    run(plain)
    streamed = make_spec(tmp_path / "streamed", api, frame, endpoint={"stream": True}, **sections)
    run(streamed)
    columns = ["review_id", "status", "content", "tool_calls", "vendor", "total", "prompt_tokens", "completion_tokens"]
    a = pl.read_parquet(plain.job.output).select(columns).sort("review_id")
    b = pl.read_parquet(streamed.job.output).select(columns).sort("review_id")
    assert a.get_column("status").to_list() == ["ok"] * 12
    assert a.get_column("tool_calls").list.len().to_list() == [1] * 12
    assert a.equals(b)


def test_the_example_streaming_job_runs(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    job = Path(__file__).resolve().parent.parent / "jobs" / "demo_stream.toml"
    output = tmp_path / "demo_stream.parquet"
    result = CliRunner().invoke(main, ["run", str(job), "--output", str(output), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "model.extra sends prediction as written" in result.output
    out = pl.read_parquet(output)
    assert out.get_column("status").unique().to_list() == ["ok"]
    assert out.get_column("reasoning_content").null_count() == 0
