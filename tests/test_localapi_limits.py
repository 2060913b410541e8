"""The local API's rate limits: per-minute quotas enforced over 1-second windows, driven by a fake clock.

Nothing here sleeps: ``RateLimits`` and ``LocalAPI`` take a ``clock`` and the tests move it by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from pipeline.localapi import LocalAPI, RateLimits, ServerConfig
from pipeline.localapi.limits import Bucket, duration, request_tokens

MODEL = "bytedance/dola-seed-2-0-lite"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def admitted_in_a_row(limits: RateLimits, tokens: int = 1) -> int:
    n = 0
    while limits.check(tokens).admitted:
        n += 1
        assert n < 10_000, "never limited"
    return n


# ---------------------------------------------------------------- the buckets, unit by unit


def test_burst_is_one_second_of_the_per_minute_quota() -> None:
    clock = FakeClock()
    limits = RateLimits(rpm=600, tpm=None, clock=clock)  # 10 a second, not 600 at once
    assert admitted_in_a_row(limits) == 10
    clock.advance(60)  # a quiet minute does not save up a minute's quota
    assert admitted_in_a_row(limits) == 10


@pytest.mark.parametrize(("rpm", "burst_s", "burst"), [(600, 1.0, 10), (600, 2.0, 20), (600, 0.5, 5), (10, 1.0, 1)])
def test_burst_size(rpm: float, burst_s: float, burst: int) -> None:
    assert admitted_in_a_row(RateLimits(rpm=rpm, tpm=None, burst_s=burst_s, clock=FakeClock())) == burst


def test_refill_is_continuous_and_capped() -> None:
    clock = FakeClock()
    limits = RateLimits(rpm=600, tpm=None, clock=clock)
    admitted_in_a_row(limits)
    refused = limits.check(1)
    assert not refused.admitted and refused.wait_s == pytest.approx(0.1)
    clock.advance(0.1)
    assert limits.check(1).admitted
    clock.advance(0.05)
    half = limits.check(1)
    assert not half.admitted and half.wait_s == pytest.approx(0.05)
    clock.advance(0.36)  # 0.41 s after the last take: four more
    assert admitted_in_a_row(limits) == 4


def test_headers_on_admitted_and_limited_answers() -> None:
    clock = FakeClock()
    limits = RateLimits(rpm=120, tpm=None, clock=clock)  # 2 a second, a bucket of 2
    first = limits.check(1)
    assert first.headers == {
        "x-ratelimit-limit-requests": "120",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "500ms",
    }
    assert limits.check(1).headers["x-ratelimit-reset-requests"] == "1s"
    clock.advance(0.25)
    limited = limits.check(1)
    assert not limited.admitted and limited.limit == "requests"
    assert limited.headers == {
        "x-ratelimit-limit-requests": "120",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "750ms",
        "Retry-After": "1",  # whole seconds, rounded up, at least 1
        "retry-after-ms": "250",  # the exact wait
    }


def test_retry_after_rounds_up_to_whole_seconds() -> None:
    clock = FakeClock()
    limits = RateLimits(rpm=None, tpm=600, clock=clock)  # 10 tokens a second, a bucket of 10
    assert limits.check(50).admitted  # bigger than the bucket: passes when full, leaves a debt of 40
    limited = limits.check(5)
    assert not limited.admitted and limited.limit == "tokens"
    assert limited.wait_s == pytest.approx(4.5)
    assert limited.headers["Retry-After"] == "5" and limited.headers["retry-after-ms"] == "4500"
    assert limited.headers["x-ratelimit-remaining-tokens"] == "0"
    assert limited.headers["x-ratelimit-reset-tokens"] == "5s"
    clock.advance(4.5)
    assert limits.check(5).admitted


def test_tpm_counts_tokens_and_a_refusal_spends_nothing() -> None:
    clock = FakeClock()
    limits = RateLimits(rpm=600, tpm=6000, clock=clock)  # 10 requests and 100 tokens a second
    assert limits.check(60).admitted
    after = limits.check(30)
    assert after.admitted and after.headers["x-ratelimit-remaining-tokens"] == "10"
    assert after.headers["x-ratelimit-remaining-requests"] == "8"
    refused = limits.check(30)
    assert not refused.admitted and refused.limit == "tokens"
    assert refused.wait_s == pytest.approx(0.2)
    # Neither bucket paid for the refused request.
    assert refused.headers["x-ratelimit-remaining-requests"] == "8"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "10"


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "completion", "body_len", "expected"),
    [
        (57, 100, 12, 999, 157),  # max_tokens is reserved up front
        (57, None, 12, 999, 69),  # without it the real completion counts
        (None, None, 0, 400, 100),  # an unparseable body: a quarter of its bytes
        (None, 50, 0, 3, 1),  # at least one token
    ],
)
def test_request_tokens(
    prompt: int | None, max_tokens: int | None, completion: int, body_len: int, expected: int
) -> None:
    assert request_tokens(prompt, max_tokens, completion, body_len) == expected


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0ms"), (0.02, "20ms"), (0.9999, "999ms"), (1.5, "1.5s"), (59.0, "59s"), (360.0, "6m0s")],
)
def test_duration_format(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_clock_going_backwards_is_not_a_refill() -> None:
    bucket = Bucket(60, 1.0, now=10.0)
    assert bucket.wait(1, 10.0) == 0.0
    bucket.take(1)
    assert bucket.wait(1, 5.0) == pytest.approx(1.0)


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="per_minute > 0"):
        RateLimits(rpm=0, tpm=None)


# ---------------------------------------------------------------- over HTTP, still on the fake clock


def body(**extra: Any) -> bytes:
    return orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Quick and friendly."}], **extra})


@pytest.fixture
def limited() -> Iterator[Any]:
    apis: list[LocalAPI] = []
    clients: list[httpx.Client] = []

    def start(**config: Any) -> tuple[LocalAPI, httpx.Client, FakeClock]:
        clock = FakeClock()
        api = LocalAPI(ServerConfig(**config), clock=clock)
        apis.append(api)
        client = httpx.Client(base_url=api.start(), timeout=5)
        clients.append(client)
        return api, client, clock

    yield start
    for client in clients:
        client.close()
    for api in apis:
        api.stop()


def post(client: httpx.Client, payload: bytes) -> httpx.Response:
    return client.post("/chat/completions", content=payload)


def test_rpm_limit_429(limited: Any) -> None:
    api, client, clock = limited(rpm=120)  # a bucket of 2 requests, refilled at 2/s
    first = post(client, body())
    assert first.status_code == 200 and first.headers["x-ratelimit-limit-requests"] == "120"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert post(client, body()).status_code == 200
    rejected = post(client, body())
    assert rejected.status_code == 429
    assert rejected.headers["Retry-After"] == "1" and rejected.headers["retry-after-ms"] == "500"
    assert rejected.headers["x-ratelimit-remaining-requests"] == "0"
    assert rejected.headers["x-ratelimit-reset-requests"] == "1s"
    assert "x-ratelimit-limit-tokens" not in rejected.headers
    assert rejected.json()["error"]["code"] == "rate_limit_exceeded"
    assert rejected.json()["error"]["type"] == "requests"
    clock.advance(0.5)
    assert post(client, body()).status_code == 200
    stats = api.stats()
    assert stats["rate_limited"] == 1 and stats["by_status"] == {200: 3, 429: 1}


def test_tpm_limit_429(limited: Any) -> None:
    _, client, clock = limited(tpm=600, burst_s=2.0)  # 20 tokens of burst, 10/s
    assert post(client, body(max_tokens=50)).status_code == 200  # bigger than the bucket: passes when full
    rejected = post(client, body(max_tokens=50))
    assert rejected.status_code == 429
    assert rejected.json()["error"]["type"] == "tokens"
    assert int(rejected.headers["Retry-After"]) >= 2
    assert rejected.headers["x-ratelimit-limit-tokens"] == "600"
    assert "x-ratelimit-limit-requests" not in rejected.headers
    clock.advance(int(rejected.headers["retry-after-ms"]) / 1000)
    assert post(client, body(max_tokens=50)).status_code == 200


def test_rate_limit_comes_before_validation(limited: Any) -> None:
    _, client, _ = limited(rpm=60)
    assert post(client, body(temperature=9)).status_code == 400
    assert post(client, body(temperature=9)).status_code == 429


@pytest.mark.parametrize(
    ("payload", "status"),
    [(body(temperature=9), 400), (body(messages=[{"role": "user", "content": "[[status:503]]"}]), 503)],
)
def test_every_answer_carries_the_headers(limited: Any, payload: bytes, status: int) -> None:
    _, client, _ = limited(rpm=600, tpm=60_000)
    response = post(client, payload)
    assert response.status_code == status
    for kind in ("requests", "tokens"):
        for name in ("limit", "remaining", "reset"):
            assert f"x-ratelimit-{name}-{kind}" in response.headers


def test_changing_the_limits_starts_full_buckets(limited: Any) -> None:
    api, client, _ = limited(rpm=60)
    assert post(client, body()).status_code == 200
    assert post(client, body()).status_code == 429
    api.config.rpm = 120
    assert post(client, body()).status_code == 200
