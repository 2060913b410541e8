"""Closed-loop pacing, driven by a hand-moved clock: nothing here waits for real."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from pipeline.sending.client import RateLimits
from pipeline.sending.pacing import Deadline, InFlightLimit, Pacing, RateControl, Window


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_window_quantiles_follow_the_last_values() -> None:
    w = Window(10)
    assert w.quantile(0.9) is None
    for v in range(100):
        w.add(float(v))
    assert len(w) == 10
    assert w.quantile(0.0) == 90.0
    assert w.quantile(0.9) == 99.0


def test_in_flight_cap_is_littles_law_and_follows_latency_up_and_down() -> None:
    limit = InFlightLimit(ceiling=2048, floor=4, start=32, headroom=1.5, window=100, queueing_s=0.0)
    assert limit.limit(100.0) == 32  # nothing observed yet: a modest start, not 1
    for _ in range(100):
        limit.on_answer(20.0)
    assert limit.limit(100.0) == 2048  # 100/s × 20 s × 1.5 = 3,000: the ceiling
    assert limit.limit(50.0) == 1500  # 50/s × 20 s × 1.5
    for _ in range(100):
        limit.on_answer(0.2)
    assert limit.limit(50.0) == 15  # latency fell: 50/s × 0.2 s × 1.5
    assert limit.limit(1.0) == 4  # the floor


def test_the_cap_holds_room_for_the_pacer_queue_as_well_as_the_latency() -> None:
    """At 47.5/s and 100 ms, rate × p90 × 1.5 = 8 slots held a run to 0.63 of the rate: slots are also
    held while waiting for the pacer, so a quarter second of sends is added."""
    limit = InFlightLimit(ceiling=2048, window=10)
    for _ in range(10):
        limit.on_answer(0.1)
    assert limit.limit(47.5) == 25  # 47.5 × (0.1 + 0.25) × 1.5


def test_before_any_answer_the_cap_grows_with_the_age_of_the_first_request() -> None:
    """A 20 s model at 100/s: nothing comes back for 20 s, yet the cap must let ~100 more out each second."""
    clock = Clock()
    limit = InFlightLimit(ceiling=4096, start=32, headroom=1.5, clock=clock)
    limit.on_send()
    assert limit.limit(100.0) == 150  # (0 s + 1 s) × 100/s × 1.5
    clock.now = 10.0
    assert limit.limit(100.0) == 1650  # everything sent in 11 s is still in flight
    clock.now = 40.0
    assert limit.limit(100.0) == 4096  # the ceiling
    assert limit.limit(None) == 32  # no rate known: AIMD from the start value


def test_in_flight_cap_grows_while_latency_is_flat_and_shrinks_when_it_rises() -> None:
    clock = Clock()
    limit = InFlightLimit(ceiling=100, start=8, recent=16, clock=clock, period_s=math.inf)  # latency alone
    for _ in range(30):
        limit.on_answer(1.0)
    assert limit.limit(None) == 38  # +1 per answer, no rate known
    for _ in range(200):
        limit.on_answer(1.0)
    assert limit.limit(None) == 100  # up to the ceiling
    for _ in range(16):
        clock.now += 0.1
        limit.on_answer(10.0)  # latency ×10: the server is queueing
    assert limit.limit(None) == 75  # one cut per median latency, not one per answer
    clock.now += 10.0
    limit.on_answer(10.0)
    assert limit.limit(None) == 56


def test_no_rpm_in_job_paces_to_the_header_limit() -> None:
    clock = Clock()
    rates = RateControl(None, None, clock=clock, margin=1.0)
    assert rates.rpm() is None
    rates.on_headers(RateLimits(limit_requests=3000, limit_tokens=1_000_000))
    assert rates.rpm() == 3000
    assert rates.tpm() == 1_000_000
    assert rates.take_message() is None  # the job set nothing: nothing to warn about


def test_job_limit_above_the_servers_follows_the_server_and_says_so_once() -> None:
    pacing = Pacing(12_000, None, clock=Clock())
    assert pacing.rpm() == 12_000
    for _ in range(3):
        pacing.on_reply(1.0, RateLimits(limit_requests=3000))
    assert pacing.rpm() == pytest.approx(3000)  # the server's limit as it says it (margin 1.0)
    assert pacing.take_message() == "server limit 3000 rpm is below the job's 12000; pacing to the server"
    assert pacing.take_message() is None
    # A job limit below the server's stays the job's.
    low = RateControl(1000, None, clock=Clock())
    low.on_headers(RateLimits(limit_requests=3000))
    assert low.rpm() == 1000 and low.take_message() is None


def test_retry_after_pauses_new_sends_until_then() -> None:
    clock = Clock()
    pacing = Pacing(600, None, clock=clock)
    assert pacing.pause_s() == 0.0
    clock.now = 10.0
    pacing.on_rate_limited(2.5)
    assert pacing.pause_s() == 2.5
    clock.now = 11.0
    pacing.on_rate_limited(0.5)  # a shorter Retry-After does not shorten the pause
    assert pacing.pause_s() == 1.5
    clock.now = 12.5
    assert pacing.pause_s() == 0.0


def test_429_without_retry_after_pauses_until_the_exhausted_bucket_resets() -> None:
    clock = Clock()
    rates = RateControl(600, None, clock=clock, default_pause_s=1.0)
    rates.on_rate_limited(None, RateLimits(remaining_requests=0, reset_requests_s=0.4, remaining_tokens=50))
    assert rates.pause_s() == pytest.approx(0.4)
    clock.now = 5.0
    rates.on_rate_limited(None, None)
    assert rates.pause_s() == 1.0


def test_a_429_burst_lowers_the_pace_once_and_it_recovers_within_seconds() -> None:
    clock = Clock()
    rates = RateControl(6000, None, clock=clock, decrease=0.7, recover_after_s=2.0, recover_step=1.5)
    for i in range(50):  # fifty 429s within 0.5 s: one burst, one decrease
        clock.now = i * 0.01
        rates.on_rate_limited(0.1)
    assert rates.rpm() == pytest.approx(4200)
    clock.now = 1.5
    assert rates.rpm() == pytest.approx(4200)  # not yet quiet long enough
    clock.now = 2.5
    assert rates.rpm() == pytest.approx(6000)  # 0.7 × 1.5 ≥ 1: back to the limit 2 s after the burst
    # Three bursts a second apart (a limit really lower) take a few seconds more, not minutes.
    for t in (10.0, 11.0, 12.0):
        clock.now = t
        rates.on_rate_limited(None)
    assert rates.factor == pytest.approx(0.343)
    seen = []
    for t in range(15, 20):
        clock.now = float(t)
        seen.append(round(rates.rpm() or 0))
    assert seen == [3087, 4630, 6000, 6000, 6000]


def test_a_429_lowers_the_pace_by_the_share_of_sends_refused() -> None:
    """A stray 429 among hundreds of sends costs a sliver; 429s that go on cost ×0.7 a second at most."""
    clock = Clock()
    rates = RateControl(6000, None, clock=clock, decrease=0.7, recover_after_s=2.0)
    for i in range(200):  # a start-up burst: 200 sends in the first second
        clock.now = i * 0.005
        rates.on_send()
    rates.on_rate_limited(0.01)  # the first 429 of three
    assert rates.factor == pytest.approx(1 - 1 / 200)
    rates.on_rate_limited(0.01)
    rates.on_rate_limited(0.01)
    assert rates.factor == pytest.approx(1 - 1 / 200)  # the same burst: one step
    # 20% of the next second's sends refused: the pace was 25% over the limit, and steps down to it.
    for i in range(100):
        clock.now = 1.0 + i * 0.01
        rates.on_send()
        if i % 5 == 0:
            rates.on_rate_limited(0.01)
    assert rates.factor == pytest.approx(1 - 1 / 200)  # within a second of the last step
    clock.now = 2.0
    rates.on_send()
    rates.on_rate_limited(0.01)  # a second on: the step measures the last second, 21 of 101 refused
    assert rates.factor == pytest.approx((1 - 1 / 200) * 0.8, rel=0.02)
    # Most of a second refused: at most ×0.7 a step.
    for i in range(100):
        clock.now = 3.0 + i * 0.01
        rates.on_send()
        rates.on_rate_limited(0.01)
    assert rates.factor == pytest.approx((1 - 1 / 200) * 0.8 * 0.7, rel=0.02)


def test_a_limit_no_header_tells_of_is_learned_from_what_the_server_admitted() -> None:
    clock = Clock()
    rates = RateControl(None, None, clock=clock)
    for i in range(600):  # a per-minute window of 600: all admitted in the first 0.6 s
        clock.now = i * 0.001
        rates.on_send()
        rates.on_admitted()
    rates.on_rate_limited(None)  # no Retry-After, no headers
    assert rates.rpm() == 600  # the first guess: what got through in the last minute
    for i in range(1, 41):  # from the first refusal on, sends at 20/s: the server admits 10 a second
        clock.now = 0.599 + i * 0.05
        rates.on_send()
        rates.on_admitted() if i % 2 == 0 else rates.on_rate_limited(None)
    assert rates.rpm() == pytest.approx(600, rel=0.1)  # measured since the refusals began


def test_headers_that_claim_room_while_the_server_refuses_are_not_followed() -> None:
    clock = Clock()
    rates = RateControl(None, None, clock=clock)
    gateway = RateLimits(limit_requests=100_000, remaining_requests=99_999)
    rates.on_headers(gateway)
    assert rates.rpm() == 100_000
    for i in range(600):
        clock.now = i * 0.001
        rates.on_send()
        rates.on_admitted()
    rates.on_rate_limited(None, gateway)
    assert rates.rpm() == 600
    rates.on_headers(gateway)  # later answers carry the same claim: it no longer sets the pace
    assert rates.rpm() == 600
    clock.now += 4.5  # quiet: probe above the learned limit, 5% a step
    assert rates.rpm() == pytest.approx(630)


def test_deadline_uses_the_cap_until_answers_then_follows_latency_with_floor_and_cap() -> None:
    deadline = Deadline(600.0, floor_s=10.0, k=3.0, quantile=0.99, min_samples=20, window=100)
    assert deadline.timeout_s() == 600.0
    for i in range(100):
        deadline.on_answer(15.0 + i * 0.1, completion_tokens=None)  # 15 … 24.9 s
    assert deadline.timeout_s() == pytest.approx(3 * 24.9)
    for _ in range(100):
        deadline.on_answer(0.5)
    assert deadline.timeout_s() == 10.0  # the floor
    for _ in range(100):
        deadline.on_answer(400.0)
    assert deadline.timeout_s() == 600.0  # the cap


def test_deadline_allows_max_tokens_at_the_observed_token_rate() -> None:
    deadline = Deadline(600.0, floor_s=1.0, min_samples=5, rate_quantile=0.1, token_margin=1.5)
    for _ in range(50):
        deadline.on_answer(10.0, completion_tokens=500)  # 50 tokens/s
    assert deadline.timeout_s() == pytest.approx(30.0)
    assert deadline.timeout_s(max_tokens=2000) == pytest.approx(2000 / 50 * 1.5)
    assert deadline.timeout_s(max_tokens=100_000) == 600.0


def test_timeouts_widen_the_deadline() -> None:
    pacing = Pacing(None, None, request_timeout_s=600.0, clock=Clock())
    for _ in range(100):
        pacing.on_reply(1.0)
    first = pacing.timeout_s()
    assert first == 10.0
    for _ in range(5):
        pacing.on_error(timed_out_s=first)
    assert pacing.timeout_s() == pytest.approx(30.0)


def test_pacing_backs_off_from_the_first_retry_when_many_requests_fail() -> None:
    pacing = Pacing(None, None, clock=Clock())
    for _ in range(20):
        pacing.on_reply(1.0)
    pacing.on_error()
    assert not pacing.failures_persist()  # one failure among answers: bad luck, retried quickly
    for _ in range(10):
        pacing.on_error()
    assert pacing.failure_rate() == pytest.approx(11 / 31)
    assert pacing.failures_persist()  # the server is failing: retries back off from the first


def test_pacing_in_flight_cap_uses_the_learned_rate() -> None:
    clock = Clock()
    pacing = Pacing(None, None, ceiling=4096, clock=clock)
    assert pacing.in_flight_limit() == 4  # narrow until the server's first 200
    pacing.on_send()
    clock.now += 20.0  # a 20 s model: the start-up ramp no longer binds by its first answer
    for _ in range(50):
        pacing.on_reply(20.0, RateLimits(limit_requests=6000))
    # 6000 rpm = 100 req/s, × (20 s + 0.25 s of pacer queueing) × 1.5 headroom.
    assert pacing.in_flight_limit() == 3038


def test_tpm_bounds_the_target_rate_through_tokens_per_answer() -> None:
    pacing = Pacing(6000, 60_000, clock=Clock())
    for _ in range(10):
        pacing.on_reply(1.0, total_tokens=100)
    assert pacing.target_rps() == pytest.approx(10.0)  # 1000 tokens/s ÷ 100 tokens < 100 requests/s


def test_the_cap_is_narrow_until_the_first_answer_and_grows_while_nothing_fails() -> None:
    clock = Clock()
    pacing = Pacing(6000, None, ceiling=4096, clock=clock)
    assert pacing.in_flight_limit() == 4
    pacing.on_send()
    clock.now += 0.1
    assert pacing.in_flight_limit() == 4
    clock.now += 0.3  # 0.4 s: two doublings
    assert pacing.in_flight_limit() == 16
    clock.now += 0.6  # 1 s: five doublings, but no more than the age-grown cap allows
    assert pacing.in_flight_limit() == 128
    pacing.on_reply(0.05)
    assert pacing.in_flight_limit() == 45  # the first 200 hands the cap to Little's law: 100/s × 0.3 s × 1.5


def test_from_the_first_answer_the_ramp_doubles_twice_as_fast_until_the_closed_loop_takes_over() -> None:
    clock = Clock()
    pacing = Pacing(None, None, ceiling=4096, clock=clock)
    pacing.on_send()
    clock.now += 0.01
    pacing.on_reply(0.01, RateLimits(limit_requests=100_000))  # a claim of 1,667 requests a second
    assert pacing.in_flight_limit() == 4
    clock.now += 0.3  # three doublings at 0.1 s
    assert pacing.in_flight_limit() == 32
    clock.now += 2.0
    assert pacing.in_flight_limit() == 650  # Little's law on the claim: 1,667/s × (0.01 s + 0.25 s) × 1.5


@pytest.mark.parametrize("failure", ["error", "refusal"])
def test_a_failure_before_the_first_answer_keeps_the_cap_narrow(failure: str) -> None:
    clock = Clock()
    pacing = Pacing(6000, None, ceiling=4096, clock=clock)
    pacing.on_send()
    pacing.on_error() if failure == "error" else pacing.on_refusal()
    clock.now += 1.0
    assert pacing.in_flight_limit() == 4
    pacing.on_reply(0.05)  # the setup works: the ramp is where 1 s of doubling every 0.2 s puts it (128),
    assert pacing.in_flight_limit() == 45  # so the closed loop's cap holds: 100/s × 0.3 s × 1.5


def test_with_no_rate_known_the_cap_grows_only_while_it_buys_throughput() -> None:
    def drive(answers_per_s: Callable[[int], float], latency_s: float, seconds: float) -> int:
        clock = Clock()
        limit = InFlightLimit(ceiling=4096, start=32, clock=clock)
        while clock.now < seconds:
            clock.now += 1.0 / answers_per_s(limit.limit(None))
            limit.on_answer(latency_s)
        return limit.limit(None)

    # A server answering in 3 ms at 2,000/s however many are in flight: 6 in flight do it, the cap holds.
    assert drive(lambda cap: 2000.0, 0.003, 5.0) <= 48  # what the first period may grow, then held
    # A server that gets faster with what is in flight, each answer 50 ms (cap ÷ 0.05 s): the cap grows.
    assert drive(lambda cap: cap / 0.05, 0.05, 5.0) >= 1000


def test_headers_whose_remaining_never_moves_while_the_run_sends_fast_are_not_followed() -> None:
    clock = Clock()
    gateway = RateControl(None, None, clock=clock)
    honest = RateControl(None, None, clock=clock)
    for i in range(60):
        clock.now = i * 0.001
        for rates in (gateway, honest):
            rates.on_send()
        gateway.on_headers(RateLimits(limit_requests=100_000, remaining_requests=99_999))
        honest.on_headers(RateLimits(limit_requests=100_000, remaining_requests=99_999 - i))
    assert honest.rpm() == 100_000
    assert gateway.rpm() is None  # 60 answers in 60 ms and remaining never moved: paced from the answers
    assert "do not count this run's requests" in (gateway.take_message() or "")
