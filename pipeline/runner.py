"""``run_job`` / ``arun_job``: the only place the stages are wired together. Wiring only, no policy.

Data flows one way::

    spec ─decide→ UpToDate (its summary) | Patch(rows) | Full, with the Prepared job (every check, every
    row parsed) ─lock: confirm, ledger→ executor (reader → prompts → ledger? → attempts(client →
    validator) → ledger) ─writer or patching→ output + manifest ─→ RunSummary

What the run has to do is ``decision``'s answer, where it sends ``localapi.endpoint``'s, what happens to
one request ``attempts``', the sending loop the ``executors``', the checks ``prepare``'s. Library code
installs no signal handlers: a caller stops a run with ``RunOptions.stop``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from pipeline import __version__
from pipeline.answers.validator import parse_document
from pipeline.errors import PartialOutputError, SeedbatchError, SpecError
from pipeline.executors import executor_for
from pipeline.job import schema_types
from pipeline.job.spec import JobSpec
from pipeline.job.stages import uses_stages
from pipeline.localapi.endpoint import endpoint_for
from pipeline.options import RunOptions, StopToken
from pipeline.records import NOT_SENT, ExitCode, RunSummary, RunTally, Selection, exit_code_for
from pipeline.requests.prepare import Prepared
from pipeline.state import incremental, uptodate
from pipeline.state.decision import Decision, Patch, UpToDate, confirm, decide, input_fingerprint
from pipeline.state.job_lock import JobLock
from pipeline.state.ledger import Ledger
from pipeline.state.patching import patch_output
from pipeline.tables import storage
from pipeline.tables.batch_output import write_batch_output
from pipeline.tables.reader import ROW_NUMBER, read_frames, selected_indices
from pipeline.tables.writer import write_atomic, write_output

__all__ = ["Decision", "ExitCode", "RunOptions", "RunSummary", "Selection", "StopToken", "arun_job", "run_job"]


def new_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def _typed_columns(p: Prepared) -> Callable[[Sequence[str | None], Sequence[str]], list[pl.Series]] | None:
    if p.schema is None:
        return None
    schema, prefix = p.schema, p.spec.output.column_prefix

    def build(contents: Sequence[str | None], statuses: Sequence[str]) -> list[pl.Series]:
        docs = [
            parse_document(c) if s == "ok" and c is not None else None for c, s in zip(contents, statuses, strict=True)
        ]
        return schema_types.typed_columns(docs, schema, prefix)

    return build


def write_manifest(spec: JobSpec, summary: RunTally, built_from: dict[str, Any] | None = None) -> Path:
    hidden = ("job", "run_id", "started_at", "ended_at", "exit_code", "output_path", "manifest_path", "up_to_date")
    data = {
        "seedbatch_version": __version__,
        "job": summary.job,
        "job_file": str(spec.source) if spec.source else None,
        "job_file_sha256": spec.source_sha256,
        "endpoint": spec.endpoint_key,
        "run_id": summary.run_id,
        "started_at": dt.datetime.fromtimestamp(summary.started_at, dt.UTC).isoformat(),
        "ended_at": dt.datetime.fromtimestamp(summary.ended_at, dt.UTC).isoformat(),
        "wall_s": round(summary.wall_s, 3),
        "exit_code": summary.exit_code,
        "output": summary.output_path,
        "ledger": str(spec.ledger_path),
        "built_from": built_from,
        **{k: v for k, v in summary.as_dict().items() if k not in hidden},
    }
    write_atomic(spec.manifest_path, orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    return spec.manifest_path


def _write_outputs(p: Prepared, ledger: Ledger, summary: RunTally) -> None:
    """The output rebuilt from the input and the ledger, or patched (``Patch``: only the rows to redo
    rewritten, every other row copied), so it always matches the ledger; then ``run_output`` and the Batch
    file when the job asks for them (a patched run has neither: ``uptodate.eligible``).

    An object output is written to its local copy, then uploaded whole (``storage``).
    """
    spec = p.spec
    typed = _typed_columns(p)
    if p.only_rows is not None:  # an incremental run (never with run_output: see uptodate.eligible)
        kept: dict[str, int] = {}
        summary.rows_by_status = patch_output(
            spec.job.output,
            read_frames(p.table, p.selection, incremental.PATCH_CHUNK_ROWS),
            ROW_NUMBER,
            ledger.answers_for_rows,
            set(p.only_rows),
            incremental.PATCH_CHUNK_ROWS,
            typed=typed,
            kept=kept,
        )
        summary.output_path = str(spec.job.output)
        summary.output_action = "patched"
        # A copied row's answer came from the ledger as surely as a looked-up one's (rows never sent are not).
        summary.rows_from_ledger += sum(n for status, n in kept.items() if status not in {*NOT_SENT, "pending"})
        return
    try:
        summary.rows_by_status = write_output(
            spec.job.output,
            read_frames(p.table, p.selection, spec.job.chunk_rows),
            ROW_NUMBER,
            ledger.answers_for_rows,
            typed=typed,
        )
    except PartialOutputError:
        summary.output_path = spec.output_location
        _upload(spec.job.output, spec.objects.get("output"))
        raise
    summary.output_path = spec.output_location
    summary.output_action = "rebuilt"
    _upload(spec.job.output, spec.objects.get("output"))
    if spec.job.batch_output is not None:
        rows = selected_indices(p.table.rows, p.selection)
        write_batch_output(spec.job.batch_output, spec.job.output, spec.job.id_column, rows, ledger.details)
    if spec.job.run_output:
        fresh = ledger.run_answers(summary.run_id)
        date = dt.date.today().isoformat()
        run_path = Path(spec.job.run_output.format(date=date, run_id=summary.run_id))
        run_path.parent.mkdir(parents=True, exist_ok=True)
        write_output(
            run_path,
            read_frames(p.table, p.selection, spec.job.chunk_rows),
            ROW_NUMBER,
            ledger.answers_for_rows,
            typed=typed,
            keep=lambda h: h in fresh,
        )
        run_uri = spec.objects.get("run_output")
        _upload(run_path, run_uri.format(date=date, run_id=summary.run_id) if run_uri else None)


def _upload(local: Path, uri: str | None) -> None:
    if uri is not None:
        storage.upload(local, uri)


async def arun_job(spec: JobSpec, options: RunOptions | None = None, decision: Decision | None = None) -> RunSummary:
    """Run a job to completion (or to a clean stop) on the running event loop; return what happened.

    ``decision`` is what the run has to do (``decision.decide``), when the caller already asked; else it
    is decided here. Usable inside a running loop (a notebook: ``await arun_job(spec)``). Raises
    ``SpecError`` or ``InputError`` before anything is sent, ``LockedError`` when another run holds the
    job. A fatal API answer mid-run does not raise: the summary says so, and output and manifest are written.
    """
    options = options or RunOptions()
    if uses_stages(spec.votes, spec.escalation):  # one plain run would write sample 0's answers as the output
        raise SpecError(
            f"{spec.source or '<job>'}: a job with [votes] or [escalation] runs in stages: "
            "use pipeline.run_stages(spec, options) (seedbatch run does)"
        )
    if decision is None:
        decision = decide(spec, options.selection, fresh=options.fresh, retry_errors=options.retry_errors)
    if isinstance(decision, UpToDate):
        return decision.summary
    p = decision.prepared
    for warning in p.warnings or ():
        if options.log:
            options.log(warning)
    execute = executor_for(spec)
    summary = RunTally(job=spec.name, run_id=new_run_id(), rows_total=p.rows, started_at=time.time())
    built_from: dict[str, Any] | None = None
    with JobLock(spec.lock_path):
        ledger, decision = confirm(spec, decision)
        p.only_rows = decision.rows if isinstance(decision, Patch) else None
        ledger.start_run(summary.run_id, spec.name, summary.started_at)
        failure: int | None = None
        try:
            with endpoint_for(spec, options) as (url, send_options):
                await execute(p, ledger, send_options, summary, url)
            ledger.flush()
            ledger_id, generation = ledger.state()  # before the output is read from it
            _write_outputs(p, ledger, summary)
            stopped = summary.stopped_by is not None
            if uptodate.complete(summary.rows_by_status, summary.errors_by_kind, stopped):
                state = {"ledger_id": ledger_id, "generation": generation}
                built_from = uptodate.built_from(spec, options.selection, input_fingerprint(p), state)
        except SeedbatchError as exc:
            failure = exc.exit_code  # the manifest and `status` must say what the process exits with
            raise
        except BaseException:
            failure = ExitCode.INTERNAL
            raise
        finally:
            summary.ended_at = time.time()
            summary.exit_code = failure if failure is not None else exit_code_for(summary)
            try:
                summary.manifest_path = str(write_manifest(spec, summary, built_from))
            except OSError:
                summary.manifest_path = None  # the run's result stands; only its record could not be written
            ledger.end_run(
                summary.run_id, summary.ended_at, summary.exit_code, orjson.dumps(summary.as_dict()).decode()
            )
            ledger.close()
    return summary.snapshot()


def run_job(spec: JobSpec, options: RunOptions | None = None, decision: Decision | None = None) -> RunSummary:
    """``arun_job`` for code without an event loop (scripts, the CLI). In a notebook, await ``arun_job``."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(arun_job(spec, options, decision))
    raise SpecError("run_job was called inside a running event loop (a notebook?): use `await arun_job(spec)`")
