"""Votes: the job's ``[votes]`` and ``[escalation]`` sections and the pure rules that judge samples.

A job with ``[votes] samples = k`` sends k requests per row. They differ only in ``seed`` (and, for
servers that ignore seeds, in ``temperature``: ``votes.temperature``), so each has its own request hash
and its own place in the ledger:

* sample 0 is the job's request exactly as a job without ``[votes]`` sends it (its answers are shared
  with such a run, in both directions);
* sample i (i ≥ 1) sends ``seed = base + i``, where ``base`` is ``model.seed`` when the job sets one,
  else 0; with ``votes.temperature`` set it also sends that temperature.

The majority rule, per field (the whole stripped answer for text jobs):

* an invalid sample (any status but ``ok``) does not vote, but it counts in the denominator: the
  agreement of a row with one invalid sample out of three is at most 2/3, so it can be escalated;
* a null field of a valid sample votes for null, like any other value;
* ties go to the answer of the earliest sample among the tied ones;
* ``agreement`` of a field is the share of the row's k samples whose value equals the majority's; a
  schema job's row ``agreement`` is the minimum over its fields (a row is as doubtful as its most doubtful
  field), each field's own is ``agreement_<field>``.
* ``confidence`` (a job asking for log-probabilities) of a field is the mean of the ``confidence`` of
  the samples that voted for its majority (samples without one are left out; none: null); a schema
  job's row ``confidence`` is the minimum over its fields, as ``agreement`` is. The samples that voted
  otherwise do not lower it: ``agreement`` already says how many there were.

A job that asks for log-probabilities is one whose ``[model.extra]`` sets ``logprobs = true``
(``asks_logprobs``); only then may ``[escalation] when_confidence_below`` be set (a load error
otherwise: without them no row has a confidence, and every row, or none, would be escalated).

This module imports nothing of seedbatch's: the job file (``spec``) and the runs (``voting``) import it.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
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
    although the job asked for log-probabilities (the server sent none, or the row has no valid answer)."""
    when_status: list[str] = Field(default_factory=list)
    """Escalate rows that ended with one of these statuses (``invalid_output``, ``truncated``, …)."""
    when_field: str | None = None
    """Escalate rows where this top-level field of the schema is null or false (e.g. ``sure = false``)."""
    model: dict[str, Any] = Field(default_factory=dict)
    """Overrides of ``[model]`` keys for the escalated requests (``name``, ``max_tokens``,
    ``reasoning_effort``, ``temperature``, ``extra``…); every other key is the job's."""
    prompt: dict[str, Any] = Field(default_factory=dict)
    """Overrides of ``[prompt]`` keys for the escalated requests (``system``, ``user``, ``few_shot``…)."""

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


def mean_confidence(confidences: Sequence[float | None], voted: Sequence[bool]) -> float | None:
    """The mean ``confidence`` of the samples that ``voted`` for the majority; None when none of them has one."""
    chosen = [c for c, v in zip(confidences, voted, strict=True) if v and c is not None]
    return sum(chosen) / len(chosen) if chosen else None


def uses_stages(votes: VotesSection | None, escalation: EscalationSection | None) -> bool:
    """Whether a job needs more than one plain run (``pipeline.voting``): k > 1 samples, or an escalation."""
    return (votes is not None and votes.samples > 1) or escalation is not None


def sample_overrides(votes: VotesSection, job_seed: int | None, index: int) -> dict[str, Any]:
    """The ``[model]`` keys sample ``index`` changes: none for sample 0, else its seed (and temperature)."""
    if index == 0:
        return {}
    out: dict[str, Any] = {"seed": (job_seed or 0) + index}
    if votes.temperature is not None:
        out["temperature"] = votes.temperature
    return out


def majority(values: Sequence[Hashable], valid: Sequence[bool]) -> tuple[Any, float, int | None]:
    """(majority value, agreement, index of the earliest sample holding it) of one field of one row.

    ``values[i]`` is sample i's value, ``valid[i]`` whether it votes. No valid sample: (None, 0.0, None).
    """
    counts: dict[Hashable, int] = {}
    first: dict[Hashable, int] = {}
    for i, (value, ok) in enumerate(zip(values, valid, strict=True)):
        if ok:
            counts[value] = counts.get(value, 0) + 1
            first.setdefault(value, i)
    if not counts:
        return None, 0.0, None
    # The most votes; among equals, the value an earlier sample gave.
    winner = min(counts, key=lambda v: (-counts[v], first[v]))
    return winner, counts[winner] / len(values), first[winner]


def voting_key(value: Any) -> Hashable:
    """A value as the vote compares it: text stripped; lists and structs (unhashable) as their repr."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (list, dict)):
        return repr(value)
    return value  # type: ignore[no-any-return]
