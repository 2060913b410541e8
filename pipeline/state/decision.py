"""What a run has to do, decided once: ``UpToDate``, ``Patch(rows)`` or ``Full``, each with its reasons.

``decide`` is the only caller of the up-to-date check (``uptodate``), the patch check and the
changed-row comparison (``incremental``). The CLI calls it before the runner loads (an up-to-date rerun
never imports polars) and hands the answer to ``run_job``; a library caller that does not, gets it
decided by ``run_job`` itself, once. ``confirm`` takes the same answer again under the job's lock:
another run may have changed the ledger between the check and the lock, and a Ray run that died left
shard ledgers whose answers are paid for.

Order of the checks, cheapest first: a job that cannot be skipped or patched (``uptodate.eligible``)
is ``Full`` without reading the manifest; an up-to-date candidate hashes its input once (under the
lock); a patch candidate compares every input row with the output (the pass that also parses them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.job.spec import JobSpec
from pipeline.records import RunSummary, Selection
from pipeline.state import uptodate
from pipeline.state.job_lock import JobLock
from pipeline.state.ledger import Ledger

if TYPE_CHECKING:
    from pipeline.requests.prepare import Prepared


@dataclass(frozen=True)
class UpToDate:
    """Nothing to do: the output was built from this input, job and ledger. ``summary`` is the answer's run."""

    summary: RunSummary
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Patch:
    """Only the input changed: redo ``rows`` (row numbers) and copy every other row of the output as it is."""

    prepared: Prepared
    rows: frozenset[int]
    #: The ledger (id, generation) the output was built from; a different one under the lock means ``Full``.
    ledger_state: tuple[str, int]
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Full:
    """Build the output whole from the input and the ledger (sending what the ledger lacks)."""

    prepared: Prepared
    reasons: tuple[str, ...]


Decision = UpToDate | Patch | Full


def decide(
    spec: JobSpec,
    selection: Selection,
    *,
    fresh: bool = False,
    retry_errors: bool = False,
) -> Decision:
    """What this run has to do (see the module docstring). Raises ``SpecError``/``InputError`` on a bad job.

    A ``Patch`` or ``Full`` answer carries the prepared job (every check done, every row parsed)."""
    if not uptodate.eligible(spec, fresh=fresh, retry_errors=retry_errors):
        reason = "--fresh" if fresh else "--retry-errors" if retry_errors else "this job is always rebuilt"
        return Full(prepare(spec, selection), (reason,))
    verdict = uptodate.check(spec, selection, content=False)
    if verdict.up_to_date:
        # Without the lock and without hashing first: a job that is not up to date (a bad one among them)
        # reaches prepare's one-line errors before anything is created, the lock file included.
        with JobLock(spec.lock_path):
            verdict = uptodate.check(spec, selection)
        if verdict.up_to_date and verdict.manifest is not None:
            return UpToDate(uptodate.summary_of(spec, verdict.manifest), (verdict.reason,))
    base = uptodate.patchable(spec, selection, fresh=fresh, retry_errors=retry_errors)
    if base is None:
        return Full(prepare(spec, selection), (verdict.reason,))
    from pipeline.requests import prepare as preparing
    from pipeline.state import incremental

    p = prepare(spec, selection, read_everything=False)
    rows = incremental.changed_rows(p)  # the pass that parses every row, as prepare's read_all does
    if rows is None:
        preparing.read_all(p)  # the comparison stopped early: parse every row before anything is paid for
        return Full(p, (verdict.reason, "too many rows changed (or rows removed, columns changed) to patch"))
    return Patch(p, rows, base, (verdict.reason, f"{len(rows):,} row(s) to redo"))


def prepare(spec: JobSpec, selection: Selection, *, read_everything: bool = True) -> Prepared:
    """``pipeline.requests.prepare.prepare``, imported when there is work to do: an up-to-date rerun loads no polars."""
    from pipeline.requests import prepare as preparing

    return preparing.prepare(spec, selection, read_everything=read_everything)


def confirm(spec: JobSpec, decision: Patch | Full) -> tuple[Ledger, Patch | Full]:
    """The job's ledger, opened under its lock, and the decision as it stands there.

    Answers in a dead Ray run's shard ledgers are merged first (they are paid for); a ledger changed
    since ``decide`` (another run finished meanwhile) turns a patch into a full build.
    """
    ledger = Ledger(spec.ledger_path, spec.endpoint_key)
    if spec.shards_dir.exists():
        ledger.merge_leftovers(spec.shards_dir)
    if isinstance(decision, Patch) and ledger.state() != decision.ledger_state:
        return ledger, Full(decision.prepared, (*decision.reasons, "the ledger changed since the check"))
    return ledger, decision


def input_fingerprint(p: Prepared) -> dict[str, Any]:
    """The input's fingerprint for the manifest's ``built_from``: the digest its check pass took."""
    return uptodate.fingerprint_of(p.spec.job.input, p.table.stat, p.table.digest)
