"""The job's ``[votes]`` and ``[escalation]`` sections: a job answered in stages.

The rules that judge the samples (majority, agreement, what each sample sends) are in
``pipeline.answers.votes``; the stages are run by ``pipeline.quality.voting``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Statuses ``[escalation] when_status`` may name: the outcomes of a row that was sent.
ESCALATION_STATUSES = ("invalid_output", "truncated", "refused", "error")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class VotesSection(_Strict):
    samples: int = Field(default=1, ge=1, le=15)
    """Requests per row (k); the majority answer is written, with ``agreement`` and ``samples`` columns."""
    temperature: float | None = Field(default=None, gt=0, le=2)
    """Sent by samples 1…k-1 as well as their seed: for servers that ignore ``seed``. Needed when
    ``model.temperature`` is 0 (greedy answers would agree by construction)."""


class EscalationSection(_Strict):
    when_agreement_below: float | None = Field(default=None, gt=0, le=1)
    """Escalate rows whose ``agreement`` is below this (1.0: every row where any sample disagrees)."""
    when_confidence_below: float | None = Field(default=None, gt=0, le=1)
    """Escalate rows whose ``confidence`` (mean token probability) is below this, or who have none
    although the job asked for log-probabilities (the server sent none, or the row has no valid answer).
    Needs ``[model.extra] logprobs = true`` (``asks_logprobs``): a load error otherwise."""
    when_status: list[str] = Field(default_factory=list)
    """Escalate rows that ended with one of these statuses (``invalid_output``, ``truncated``, …)."""
    when_field: str | None = None
    """Escalate rows where this top-level field of the schema is null or false (e.g. ``sure = false``)."""
    model: dict[str, Any] = Field(default_factory=dict)
    """Overrides of ``[model]`` keys for the escalated requests (``name``, ``max_tokens``,
    ``reasoning_effort``, ``temperature``, ``extra``…); every other key is the job's."""
    prompt: dict[str, Any] = Field(default_factory=dict)
    """Overrides of ``[prompt]`` keys for the escalated requests (``system``, ``user``, ``few_shot``…)."""
    pricing: dict[str, float] = Field(default_factory=dict)
    """Overrides of ``[pricing]`` keys for the escalated requests: needed when ``model.name`` changes in a
    job with ``[pricing]`` (that table is the job's model's price, not the stronger one's)."""

    @model_validator(mode="after")
    def _checked(self) -> EscalationSection:
        unknown = [s for s in self.when_status if s not in ESCALATION_STATUSES]
        if unknown:
            raise ValueError(f"when_status {unknown[0]!r} is not one of {list(ESCALATION_STATUSES)}")
        conditions = (self.when_agreement_below, self.when_confidence_below, self.when_field)
        if all(c is None for c in conditions) and not self.when_status:
            raise ValueError(
                "names no condition: set when_agreement_below, when_confidence_below, when_status or when_field"
            )
        if not self.model and not self.prompt:
            raise ValueError("names no stronger setting: set [escalation.model] or [escalation.prompt] keys")
        return self


def asks_logprobs(extra: Mapping[str, Any]) -> bool:
    """Whether a job's ``[model.extra]`` asks the server for token log-probabilities (``logprobs = true``)."""
    return extra.get("logprobs") is True


def uses_stages(votes: VotesSection | None, escalation: EscalationSection | None) -> bool:
    """Whether a job needs more than one plain run (``pipeline.quality.voting``): k > 1 samples, or an escalation."""
    return (votes is not None and votes.samples > 1) or escalation is not None
