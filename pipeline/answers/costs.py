"""Usage → credits and USD. The provider's ``meta.usage`` wins; a price table fills in otherwise."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.job.spec import JobSpec
from pipeline.records import Usage

#: AIML API credits per US dollar (the reference's example: 6653 credits = $0.0033265).
CREDITS_PER_USD = 2_000_000


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens. Reasoning tokens are completion tokens and billed as such."""

    input_per_million: float
    output_per_million: float

    def usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million) / 1e6


#: Bundled prices. dola-seed-2-0-lite's is fitted to the reference's example response
#: (57 prompt + 1272 completion tokens billed $0.0033265: this table gives $0.0033243, 0.07% off);
#: check the provider's page and override with [pricing] in the job when it matters.
DEFAULT_PRICES: dict[str, Price] = {
    "bytedance/dola-seed-2-0-lite": Price(0.30, 2.60),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
}


#: Presets that are servers you run: their tokens cost nothing unless the job has [pricing].
SELF_HOSTED = ("llamacpp", "vllm")


def price_for(spec: JobSpec) -> Price | None:
    if spec.pricing is not None:
        return Price(spec.pricing.input_per_million, spec.pricing.output_per_million)
    if spec.endpoint.preset in SELF_HOSTED:
        # Your own server bills nothing per token, whatever model.name says: `seedbatch run
        # jobs/label_reviews.toml --endpoint llamacpp` keeps the job's hosted model name, which
        # llama.cpp ignores, and must not be priced as that provider's model.
        return Price(0.0, 0.0)
    if spec.endpoint.preset == "local" and spec.model.name not in DEFAULT_PRICES:
        # The built-in local API imitates a provider: known models keep their table price for the demo.
        return Price(0.0, 0.0)
    return DEFAULT_PRICES.get(spec.model.name)


def fill_cost(usage: Usage, price: Price | None) -> Usage:
    """Complete ``credits_used``/``usd_spent`` from the price table when the server did not report them."""
    if usage.usd_spent is not None:
        if usage.credits_used is None:
            return _with(usage, credits=usage.usd_spent * CREDITS_PER_USD, usd=usage.usd_spent)
        return usage
    if usage.credits_used is not None:
        return _with(usage, credits=usage.credits_used, usd=usage.credits_used / CREDITS_PER_USD)
    if price is None or usage.prompt_tokens is None:
        return usage
    usd = price.usd(usage.prompt_tokens or 0, usage.completion_tokens or 0)
    return _with(usage, credits=usd * CREDITS_PER_USD, usd=usd)


def worst_case_usd(est_prompt_tokens: int, max_tokens: int, price: Price | None) -> float:
    """The most one attempt can cost: the estimated prompt (with 25% slack) and every allowed token."""
    if price is None:
        return 0.0
    return price.usd(int(est_prompt_tokens * 1.25) + 16, max_tokens)


def _with(usage: Usage, *, credits: float, usd: float) -> Usage:
    return Usage(
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
        usage.reasoning_tokens,
        usage.cached_tokens,
        credits,
        usd,
    )
