"""``attempts.Attempts``: one request's whole policy, with a fake ``send`` and an injected sleep.

No server and no real waiting: every test scripts what ``send`` returns or raises, records the bodies
it was given and the waits the policy asked for, and checks the outcome.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson
import pytest

from pipeline.answers.validator import judge
from pipeline.errors import RetryableError, RowError
from pipeline.job.schema_types import compile_validator
from pipeline.records import Reply, Request, RunTally
from pipeline.sending.attempts import AnswerPolicy, Attempts
from pipeline.sending.buckets import Pacer
from pipeline.sending.budget import Budget
from pipeline.sending.pacing import Pacing
from pipeline.sending.retries import RetryPolicy

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["pos", "neg"]}},
    "required": ["label"],
    "additionalProperties": False,
}


def reply(content: str, finish: str = "stop", tokens: int = 5) -> Reply:
    data = {
        "id": "r",
        "model": "m",
        "choices": [{"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": 10 + tokens},
    }
    return Reply(data=data, latency_ms=20.0)


def request(temperature: float | None = 0.0, max_tokens: int = 50) -> Request:
    body: dict[str, Any] = {"model": "m", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}
    if temperature is not None:
        body["temperature"] = temperature
    return Request(0, "r-0", orjson.dumps(body, option=orjson.OPT_SORT_KEYS), "h" * 32, 10, max_tokens)


class Script:
    """A fake ``send``: answers (or raises) from a list, recording each body and timeout it got."""

    def __init__(self, *steps: Reply | Exception) -> None:
        self.steps = list(steps)
        self.bodies: list[dict[str, Any]] = []
        self.timeouts: list[float | None] = []

    async def __call__(self, body: bytes, timeout_s: float | None) -> Reply:
        self.bodies.append(orjson.loads(body))
        self.timeouts.append(timeout_s)
        step = self.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


def make(
    send: Script,
    *,
    schema: dict[str, Any] | None = SCHEMA,
    budget: float | None = None,
    sleeps: list[float] | None = None,
    **policy: Any,
) -> tuple[Attempts, RunTally]:
    waits = sleeps if sleeps is not None else []
    clock_value = [0.0]
    clock: Callable[[], float] = lambda: clock_value[0]  # noqa: E731

    async def sleep(seconds: float) -> None:  # time passes only when the policy waits
        waits.append(seconds)
        clock_value[0] += seconds

    pacing = Pacing(None, None, clock=clock, request_timeout_s=120.0)
    retry = RetryPolicy(**{k: policy.pop(k) for k in ("max_attempts", "rate_limit_wait_s") if k in policy})
    summary = RunTally(job="t", run_id="r")
    check = compile_validator(schema) if schema is not None else None
    attempts = Attempts(
        send=send,
        pacer=Pacer(None, None, control=pacing, clock=clock, sleep=sleep),
        pacing=pacing,
        budget=Budget(budget),
        judge=partial(judge, expects_json=schema is not None, check=check),
        price=None,
        policy=AnswerPolicy(retry=retry, **policy),
        summary=summary,
        stop=asyncio.Event(),
        sleep=sleep,
    )
    return attempts, summary


def answer(attempts: Attempts, req: Request | None = None) -> Any:
    return asyncio.run(attempts.answer(req or request()))


def test_ok_on_the_first_try() -> None:
    send = Script(reply('{"label": "pos"}'))
    attempts, summary = make(send)
    out = answer(attempts)
    assert (out.status, out.attempts, out.content) == ("ok", 1, '{"label": "pos"}')
    assert summary.requests_sent == 1 and summary.retries == 0
    assert send.timeouts == [None], "until latencies are known, the request is watched, not given a timeout"


def test_429s_pace_but_never_use_up_attempts() -> None:
    """Five 429s with max_attempts = 2: the row still ends ok; each wait is the server's Retry-After."""
    limited = [RetryableError("HTTP 429", status_code=429, kind="http_429", retry_after=2.0) for _ in range(5)]
    sleeps: list[float] = []
    attempts, summary = make(Script(*limited, reply('{"label": "neg"}')), sleeps=sleeps, max_attempts=2)
    out = answer(attempts)
    assert out.status == "ok" and out.attempts == 6
    assert summary.http_429 == 5
    assert len(sleeps) >= 5 and all(1.9 <= s <= 4.5 for s in sleeps), sleeps


def test_429_waiting_is_bounded_by_time() -> None:
    limited = [RetryableError("HTTP 429", status_code=429, kind="http_429", retry_after=10.0) for _ in range(10)]
    attempts, _ = make(Script(*limited), rate_limit_wait_s=25.0)
    out = answer(attempts)
    assert out.status == "error" and out.error_kind == "http_429"
    assert "the next run sends it again" in out.error


def test_server_errors_use_up_attempts_first_retry_is_quick() -> None:
    failing = [RetryableError("HTTP 503", status_code=503, kind="http_503") for _ in range(3)]
    sleeps: list[float] = []
    attempts, summary = make(Script(*failing), sleeps=sleeps, max_attempts=3)
    out = answer(attempts)
    assert (out.status, out.error_kind, out.attempts) == ("error", "http_503", 3)
    assert sleeps[0] < 0.3, "a lone failure is retried at once, not after a full backoff"
    assert summary.retries == 2


def test_row_error_is_final_at_once() -> None:
    attempts, _ = make(Script(RowError("HTTP 400: bad", status_code=400, kind="http_400")))
    out = answer(attempts)
    assert (out.status, out.error_kind, out.attempts) == ("error", "http_400", 1)


def test_a_refusal_no_other_row_can_settle_is_a_row_error_without_the_hold() -> None:
    """A refusal is held until it is known whether every row gets it; with no other row left to send or in
    flight, nothing can tell, so the row ends at once (a ``--retry-errors`` rerun of two rows waited 10 s)."""
    refused = RowError("HTTP 400: bad", status_code=400, kind="http_400")
    sleeps: list[float] = []
    attempts, _ = make(Script(refused), sleeps=sleeps)
    out = answer(attempts)
    assert out.status == "error" and sleeps == [attempts.hold_s], "while more rows may come, it is held"

    sleeps.clear()
    attempts, _ = make(Script(RowError("HTTP 400: bad", status_code=400, kind="http_400")), sleeps=sleeps)
    attempts.no_more_rows()
    out = answer(attempts)
    assert (out.status, out.error_kind) == ("error", "http_400")
    assert attempts.hold_s not in sleeps


def test_reask_carries_the_error_and_differs() -> None:
    send = Script(reply('{"label": "maybe"}'), reply('{"label": "pos"}'))
    attempts, _ = make(send, invalid_retries=2, reask_with_error=True)
    out = answer(attempts)
    assert out.status == "ok" and out.attempts == 2
    second = send.bodies[1]["messages"]
    assert second[-2] == {"role": "assistant", "content": '{"label": "maybe"}'}
    assert "'maybe' is not one of" in second[-1]["content"]


def test_without_reask_a_deterministic_retry_steps_the_temperature() -> None:
    send = Script(reply('{"label": "maybe"}'), reply('{"label": "maybe"}'), reply('{"label": "pos"}'))
    attempts, _ = make(send, invalid_retries=2, reask_with_error=False)
    out = answer(attempts)
    assert out.status == "ok"
    assert [b["temperature"] for b in send.bodies] == [0.0, 0.3, 0.6]
    assert len({orjson.dumps(b, option=orjson.OPT_SORT_KEYS) for b in send.bodies}) == 3


def test_the_same_wrong_answer_twice_never_sends_the_same_reask_twice() -> None:
    """Re-asks built from an identical wrong answer would be identical: the second one is varied."""
    send = Script(reply('{"label": "maybe"}'), reply('{"label": "maybe"}'), reply('{"label": "maybe"}'))
    attempts, _ = make(send, invalid_retries=2, reask_with_error=True)
    out = answer(attempts)
    assert out.status == "invalid_output" and out.attempts == 3
    bodies = [orjson.dumps(b, option=orjson.OPT_SORT_KEYS) for b in send.bodies]
    assert len(set(bodies)) == 3, "no request of a row is ever sent identical to an earlier one"
    assert send.bodies[2]["temperature"] == 0.3


def test_truncated_is_retried_only_with_more_max_tokens() -> None:
    send = Script(reply('{"label": "p', finish="length"), reply('{"label": "pos"}'))
    attempts, _ = make(send, truncated_retries=1, max_tokens_cap=1000)
    out = answer(attempts)
    assert out.status == "ok"
    assert [b["max_tokens"] for b in send.bodies] == [50, 100]


def test_truncated_without_retries_is_not_sent_again() -> None:
    send = Script(reply('{"label": "p', finish="length"))
    attempts, _ = make(send)
    out = answer(attempts)
    assert (out.status, out.attempts) == ("truncated", 1)


def test_budget_refusal_leaves_the_row_pending_and_stops_the_run() -> None:
    attempts, summary = make(Script(), budget=0.0)
    attempts.price = __import__("pipeline.answers.costs", fromlist=["Price"]).Price(1.0, 1.0)
    out = answer(attempts)
    assert out is None
    assert attempts.budget_hit and attempts.stop.is_set()
    assert summary.requests_sent == 0


def test_a_stopped_run_sends_nothing_new() -> None:
    attempts, summary = make(Script())
    attempts.stop.set()
    assert answer(attempts) is None
    assert summary.requests_sent == 0


def test_prior_failed_answer_adds_its_usage_and_attempts() -> None:
    from pipeline.records import Outcome, Usage

    prior = Outcome("h" * 32, "error", usage=Usage(10, 5, 15), error_kind="http_503", attempts=6)
    attempts, _ = make(Script(reply('{"label": "pos"}')))
    out = asyncio.run(attempts.answer(request(), prior))
    assert out.attempts == 7
    assert out.usage.prompt_tokens == 20


@pytest.mark.parametrize("temperature", [None, 1.0])
def test_sampling_step_moves_the_seed_when_the_temperature_cannot_rise(temperature: float | None) -> None:
    send = Script(reply('{"label": "maybe"}'), reply('{"label": "pos"}'))
    attempts, _ = make(send, invalid_retries=1, reask_with_error=False)
    out = answer(attempts, request(temperature))
    assert out.status == "ok"
    assert send.bodies[1]["seed"] == 1


def test_a_request_sent_before_latencies_were_known_is_abandoned_when_they_are() -> None:
    """The first requests go out with no deadline known; one that hangs is cut once answers set one."""
    from pipeline.sending.pacing import Deadline

    pacing = Pacing(None, None, deadline=Deadline(5.0, floor_s=0.2, min_samples=2))

    async def hang_then_answer(body: bytes, timeout_s: float | None) -> Reply:
        if not hung:
            hung.append(True)
            await asyncio.sleep(3600)  # the hung request
        return reply('{"label": "pos"}')

    hung: list[bool] = []

    async def go() -> Any:
        attempts = Attempts(
            send=hang_then_answer,
            pacer=Pacer(None, None, control=pacing),
            pacing=pacing,
            budget=Budget(None),
            judge=partial(judge, expects_json=True, check=compile_validator(SCHEMA)),
            price=None,
            policy=AnswerPolicy(retry=RetryPolicy(max_attempts=3)),
            summary=RunTally(job="t", run_id="r"),
            stop=asyncio.Event(),
        )
        answering = asyncio.ensure_future(attempts.answer(request()))
        await asyncio.sleep(0.05)
        for _ in range(2):  # other requests come back fast: the deadline becomes 0.2 s
            pacing.on_reply(0.01)
        return await asyncio.wait_for(answering, 10)

    out = asyncio.run(go())
    assert out.status == "ok" and out.attempts == 2
