"""Votes: the pure rules that judge a row's samples (the job's ``[votes]`` section is in ``job.stages``).

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
(``job.stages.asks_logprobs``); only then may ``[escalation] when_confidence_below`` be set (a load error
otherwise: without them no row has a confidence, and every row, or none, would be escalated).

Pure: the runs (``quality.voting``) and the plan (``planning``) call it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from pipeline.job.stages import VotesSection


def mean_confidence(confidences: Sequence[float | None], voted: Sequence[bool]) -> float | None:
    """The mean ``confidence`` of the samples that ``voted`` for the majority; None when none of them has one."""
    chosen = [c for c, v in zip(confidences, voted, strict=True) if v and c is not None]
    return sum(chosen) / len(chosen) if chosen else None


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
