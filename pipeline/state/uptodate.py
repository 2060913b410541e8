"""Whether a job's output is up to date: built from this input, this job and this ledger.

Every finished run records in its manifest what its output was built from (``built_from``): the
input's size, mtime and xxh3-128 digest of its bytes, a digest of the job as it affects the output, the
selection, the ledger's id and generation (``Ledger.state``: bumped by every change to its answers), the
output's size and mtime, and the seedbatch version. A rerun whose every part is unchanged has
nothing to send and would write the same file: ``run`` says so and exits, ``status`` and ``plan`` count
from the output instead of rendering every row.

Only a complete output is a base: no pending row, no error the next run would send again by itself.
``--fresh`` and ``--retry-errors`` always do the work; so do jobs with media columns or message lists (the
request hashes cover image files the input only names), jobs with ``job.run_output`` or ``job.batch_output`` (each
run writes its own file; the batch file is rebuilt from the output), jobs whose input or output is an object
(``s3://…``: the local copy says nothing of the object, and an upload may be owed) and CSV/JSONL outputs (the
fast paths read Parquet). The input's bytes are hashed on every check: ``cp -p``, ``rsync -a`` and ``tar``
replace a file keeping its size and mtime, so those two say nothing about its content. The hash is
xxh3-128 (``xxhash``), streamed: it costs about what reading the file costs, and nothing here needs a
cryptographic hash (the user owns the input). A run does not read its input for it: the input's check
pass (``reader.open_input``) digests the bytes it reads; only an up-to-date check reads them itself.
Which of up to date, patch or rebuild a run does is ``decision.decide``'s answer.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import xxhash

from pipeline import __version__
from pipeline.job.spec import JobSpec
from pipeline.records import RunSummary, RunTally, Selection, exit_code_for, is_transient
from pipeline.state.ledger import Ledger

#: Job sections that change how fast rows are sent, never what an answer or the output is.
_PACE_ONLY = {"limits", "executor"}
#: The key of the input's content digest in ``built_from.input`` (a manifest with another key is not a base).
DIGEST = "xxh3_128"
_READ_BYTES = 1 << 20


@dataclass(frozen=True)
class Verdict:
    """The check's answer: up to date or not, why, and the manifest it read."""

    up_to_date: bool
    reason: str
    manifest: dict[str, Any] | None = None


def eligible(spec: JobSpec, *, fresh: bool, retry_errors: bool) -> bool:
    """Whether a run of this job may be skipped at all (see the module docstring)."""
    if fresh or retry_errors or spec.job.run_output or spec.job.batch_output is not None:
        return False
    if spec.objects or spec.job.output.suffix.lower() not in (".parquet", ".pq"):
        return False
    if spec.prompt.messages_column is not None or spec.job.input_format == "openai_batch":
        return False  # message lists may name local images, like media columns
    return not (spec.media.image_columns or spec.media.video_columns)


def job_digest(spec: JobSpec, selection: Selection) -> str:
    """sha256 of the job as it shapes the output: every section but the pacing ones, the bytes of the files
    it names (the schema, the tools), the endpoint answers come from, and the selection."""
    data = spec.model_dump(mode="json", exclude=_PACE_ONLY)
    h = hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS, default=str))
    for named in (spec.output.schema_, spec.model.tools):
        if named is not None and not isinstance(named, dict | list):
            try:
                h.update(Path(named).read_bytes())
            except OSError:
                h.update(b"(unreadable)")
        h.update(b"\x1e")
    h.update(spec.endpoint_key.encode())
    h.update(json.dumps([selection.limit, selection.sample, selection.sample_seed]).encode())
    return h.hexdigest()


def _digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    buf = bytearray(_READ_BYTES)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _stat(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint_of(path: Path, stat: tuple[int, int] | None, digest: str | None) -> dict[str, Any]:
    """Path, size, mtime and digest of the input's bytes, for ``built_from``.

    ``stat`` (size, mtime_ns) and ``digest`` are what the input's check pass saw (``InputTable``): its
    stat is taken before that pass opens the file, so a change while it reads makes the next run look
    again. A pass that took no digest (None) has the file hashed here.
    """
    fp = _stat(path)
    if stat is not None:
        fp["size"], fp["mtime_ns"] = stat
    fp[DIGEST] = digest if digest is not None else _digest(path)
    return fp


def ledger_state(spec: JobSpec) -> dict[str, Any] | None:
    if not spec.ledger_path.exists():
        return None
    ledger = Ledger(spec.ledger_path, spec.endpoint_key)
    try:
        ledger_id, generation = ledger.state()
    finally:
        ledger.close()
    return {"ledger_id": ledger_id, "generation": generation}


def output_fingerprint(path: Path) -> dict[str, Any] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def complete(rows_by_status: dict[str, int], errors_by_kind: dict[str, int], stopped: bool) -> bool:
    """Whether a rerun of the same job would send nothing: no pending row, no error it retries by itself.

    ``errors_by_kind`` counts every failed attempt, also those a retry then answered: a run with one 429 or
    dropped connection on the way is still complete when no row ended in an error (else a large run, where
    a few retried requests are the norm, would never be up to date and every rerun would redo the whole job).
    """
    if stopped or rows_by_status.get("pending"):
        return False
    if not rows_by_status.get("error"):
        return True
    return not any(is_transient(kind) for kind in errors_by_kind)


def built_from(
    spec: JobSpec, selection: Selection, input_fp: dict[str, Any], ledger: dict[str, Any]
) -> dict[str, Any] | None:
    """The manifest's record of what the output (as it is on disk now) was built from."""
    output = output_fingerprint(spec.job.output)
    if output is None:
        return None
    return {
        "seedbatch_version": __version__,
        "job_sha256": job_digest(spec, selection),
        "input": input_fp,
        "ledger": ledger,
        "output": output,
    }


def read_manifest(spec: JobSpec) -> dict[str, Any] | None:
    try:
        data = orjson.loads(spec.manifest_path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def check(spec: JobSpec, selection: Selection, *, content: bool = True) -> Verdict:
    """Whether the output on disk is what a rerun with this input, job and ledger would write.

    The input's bytes are hashed last, once every other part holds; ``content=False`` checks everything
    else (a cheap first look, before the job's lock is taken).
    """
    data = read_manifest(spec)
    if data is None:
        return Verdict(False, "no manifest")
    base = data.get("built_from")
    if not isinstance(base, dict):
        return Verdict(False, "the last run left work to do (or predates built_from)")
    if base.get("seedbatch_version") != __version__:
        return Verdict(False, f"built by seedbatch {base.get('seedbatch_version')}, this is {__version__}")
    if output_fingerprint(spec.job.output) != base.get("output"):
        return Verdict(False, "the output is missing or was changed")
    if base.get("job_sha256") != job_digest(spec, selection):
        return Verdict(False, "the job (or the selection) changed")
    old = base.get("input") or {}
    try:
        now = _stat(spec.job.input)
    except OSError:
        return Verdict(False, "the input is missing")
    if old.get("path") != now["path"] or old.get("size") != now["size"]:
        return Verdict(False, "the input changed")
    if base.get("ledger") != ledger_state(spec):
        return Verdict(False, "the ledger changed")
    if content:
        try:
            digest = _digest(spec.job.input)
        except OSError:
            return Verdict(False, "the input is missing")
        if digest != old.get(DIGEST):
            same = " (same size and mtime)" if old.get("mtime_ns") == now["mtime_ns"] else ""
            return Verdict(False, f"the input's bytes changed{same}")
    return Verdict(True, "input, job and ledger unchanged since the output was written", data)


def patchable(
    spec: JobSpec, selection: Selection, *, fresh: bool = False, retry_errors: bool = False
) -> tuple[str, int] | None:
    """The ledger state (id, generation) the output was built from, when only the input changed since:
    same job, ledger, output and version. None otherwise. The caller checks the state again once it
    holds the job's lock.

    Then the output can be patched row by row (``incremental``) instead of rebuilt from every row.
    Local runs of the whole input or its first rows only (a sample's rows are not numbered by position).
    """
    if not eligible(spec, fresh=fresh, retry_errors=retry_errors):
        return None
    if spec.executor.kind != "local" or selection.sample is not None:
        return None
    data = read_manifest(spec)
    base = data.get("built_from") if data else None
    if not isinstance(base, dict) or base.get("seedbatch_version") != __version__:
        return None
    if output_fingerprint(spec.job.output) != base.get("output"):
        return None
    if base.get("job_sha256") != job_digest(spec, selection):
        return None
    if (base.get("input") or {}).get("path") != str(spec.job.input.resolve()):
        return None
    ledger = base.get("ledger")
    if not isinstance(ledger, dict) or ledger != ledger_state(spec):
        return None
    return str(ledger["ledger_id"]), int(ledger["generation"])


def summary_of(spec: JobSpec, manifest: dict[str, Any]) -> RunSummary:
    """The summary of a run that had nothing to do: the counts of the run that built the output."""
    now = time.time()
    summary = RunTally(
        job=spec.name,
        run_id=str(manifest.get("run_id")),
        rows_total=int(manifest.get("rows_total") or 0),
        rows_by_status=dict(manifest.get("rows_by_status") or {}),
        started_at=now,
        ended_at=now,
        output_path=str(spec.job.output),
        manifest_path=str(spec.manifest_path),
        up_to_date=True,
        output_action="up_to_date",
    )
    by_status = summary.rows_by_status
    summary.rows_from_ledger = summary.rows_total - by_status.get("too_long", 0) - by_status.get("skipped", 0)
    summary.exit_code = exit_code_for(summary)
    return summary.snapshot()
