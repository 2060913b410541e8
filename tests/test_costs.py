"""Costs: the provider's meta.usage first, then the price table; checked against the reference example."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from pipeline.answers.costs import CREDITS_PER_USD, DEFAULT_PRICES, Price, fill_cost, price_for, worst_case_usd
from pipeline.answers.validator import parse_usage
from pipeline.job.spec import DEFAULT_MODEL, JobSpec, spec_from_dict
from pipeline.records import Usage

REFERENCE_DOC = Path(__file__).resolve().parents[2] / "shared" / "api" / "dola-seed-2.0-lite.md"


def make_spec(**sections: dict[str, Any]) -> JobSpec:
    data: dict[str, Any] = {"job": {"input": "in.csv", "output": "out.parquet"}, "prompt": {"user": "{t}"}}
    data.update(sections)
    return spec_from_dict(data, "t.toml")


def reference_numbers() -> tuple[int, int, int, float]:
    """prompt_tokens, completion_tokens, credits_used, usd_spent from the reference's example response."""
    if REFERENCE_DOC.exists():
        text = REFERENCE_DOC.read_text()

        def num(name: str) -> str:
            found = re.findall(rf'"{name}":\s*([0-9.]+)', text)
            assert len(found) == 1, name
            return str(found[0])

        return (
            int(num("prompt_tokens")),
            int(num("completion_tokens")),
            int(num("credits_used")),
            float(num("usd_spent")),
        )
    return 57, 1272, 6653, 0.0033265  # copied from the reference when it is not checked out beside us


def test_default_price_reproduces_the_reference_example_within_1_percent() -> None:
    prompt, completion, _, usd = reference_numbers()
    price = price_for(make_spec())
    assert price is DEFAULT_PRICES[DEFAULT_MODEL]
    estimate = price.usd(prompt, completion)
    assert estimate == pytest.approx(usd, rel=0.01)
    # And through fill_cost, as the runner uses it when meta.usage is missing.
    filled = fill_cost(Usage(prompt, completion, prompt + completion), price)
    assert filled.usd_spent == pytest.approx(usd, rel=0.01)


def test_credits_per_usd_matches_the_reference_example() -> None:
    _, _, credits, usd = reference_numbers()
    assert credits / usd == pytest.approx(CREDITS_PER_USD, rel=1e-6)


def test_meta_usd_is_used_first() -> None:
    usage = Usage(57, 1272, 1329, credits_used=6653.0, usd_spent=0.0033265)
    assert fill_cost(usage, Price(100.0, 100.0)) == usage  # reported cost untouched, price ignored


def test_meta_usd_without_credits_fills_credits() -> None:
    got = fill_cost(Usage(1, 2, 3, usd_spent=0.01), Price(100.0, 100.0))
    assert got.usd_spent == 0.01
    assert got.credits_used == pytest.approx(0.01 * CREDITS_PER_USD)
    assert (got.prompt_tokens, got.completion_tokens, got.total_tokens) == (1, 2, 3)


def test_meta_credits_without_usd_fills_usd() -> None:
    got = fill_cost(Usage(1, 2, 3, credits_used=6653.0), Price(100.0, 100.0))
    assert got.credits_used == 6653.0
    assert got.usd_spent == pytest.approx(0.0033265)


def test_reference_reply_parsed_then_filled_keeps_provider_cost() -> None:
    data = {
        "usage": {"prompt_tokens": 57, "completion_tokens": 1272, "total_tokens": 1329},
        "meta": {"usage": {"credits_used": 6653, "usd_spent": 0.0033265}},
    }
    got = fill_cost(parse_usage(data), DEFAULT_PRICES[DEFAULT_MODEL])
    assert got.usd_spent == 0.0033265
    assert got.credits_used == 6653.0


def test_price_table_fallback() -> None:
    price = Price(2.0, 8.0)
    got = fill_cost(Usage(prompt_tokens=1_000, completion_tokens=500, total_tokens=1_500, reasoning_tokens=200), price)
    assert got.usd_spent == pytest.approx((1_000 * 2.0 + 500 * 8.0) / 1e6)
    assert got.usd_spent is not None
    assert got.credits_used == pytest.approx(got.usd_spent * CREDITS_PER_USD)
    assert got.reasoning_tokens == 200  # reasoning is inside completion: not billed twice
    # Missing completion tokens count as zero; missing prompt tokens mean "unknown", not free.
    assert fill_cost(Usage(prompt_tokens=1_000), price).usd_spent == pytest.approx(0.002)
    assert fill_cost(Usage(completion_tokens=10), price) == Usage(completion_tokens=10)
    assert fill_cost(Usage(1, 2, 3), None) == Usage(1, 2, 3)


def test_price_for_job_pricing_overrides_everything() -> None:
    spec = make_spec(pricing={"input_per_million": 1.0, "output_per_million": 3.0}, endpoint={"preset": "llamacpp"})
    assert price_for(spec) == Price(1.0, 3.0)


@pytest.mark.parametrize("preset", ["llamacpp", "vllm", "local"])
def test_self_hosted_presets_are_free_for_unknown_models(preset: str) -> None:
    spec = make_spec(endpoint={"preset": preset}, model={"name": "gemma-3-270m"})
    price = price_for(spec)
    assert price == Price(0.0, 0.0)
    assert fill_cost(Usage(1_000, 1_000, 2_000), price).usd_spent == 0.0
    assert worst_case_usd(10_000, 4_096, price) == 0.0


def test_local_preset_with_a_known_model_keeps_its_table_price() -> None:
    # The built-in local API imitates the AIML API, including meta.usage, so the demo shows real-looking cost.
    assert price_for(make_spec(endpoint={"preset": "local"})) == DEFAULT_PRICES[DEFAULT_MODEL]


def test_unknown_model_on_paid_preset_has_no_price() -> None:
    assert price_for(make_spec(model={"name": "mystery/model"})) is None
    assert price_for(make_spec(endpoint={"preset": "openai"}, model={"name": "gpt-4o"})) == Price(2.50, 10.00)


def test_worst_case_usd() -> None:
    price = Price(1.0, 10.0)
    # 25% slack on the prompt estimate plus 16, and every allowed completion token.
    assert worst_case_usd(100, 1_000, price) == pytest.approx(((125 + 16) * 1.0 + 1_000 * 10.0) / 1e6)
    assert worst_case_usd(0, 1, price) == pytest.approx((16 + 10) / 1e6)
    assert worst_case_usd(100, 1_000, None) == 0.0
    # Never below what the reference example actually cost with its max_tokens.
    prompt, completion, _, usd = reference_numbers()
    assert worst_case_usd(prompt, completion, DEFAULT_PRICES[DEFAULT_MODEL]) >= usd * 0.99


@pytest.mark.parametrize("preset", ["llamacpp", "vllm"])
def test_own_server_is_free_even_under_a_hosted_models_name(preset: str) -> None:
    # `seedbatch run jobs/label_reviews.toml --endpoint llamacpp` keeps the job's AIML model name.
    spec = make_spec(endpoint={"preset": preset})
    assert spec.model.name in DEFAULT_PRICES
    assert price_for(spec) == Price(0.0, 0.0)
