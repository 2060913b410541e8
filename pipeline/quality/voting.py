"""A job with ``[votes]`` or ``[escalation]``: its stages as ordinary runs, then one output from them.

Each sample is an ordinary run of the job (``run_job``) with its own seed, its own output under
``<output>.votes/`` and the job's own ledger, so a killed run resumes sample by sample without paying
any request twice, and identical rows share their answers as in any run. The escalation stage is one
more run, of the stronger setting, over an input holding only the doubtful rows. The job's output is
then built from those outputs (``combine``): majority answer, ``agreement``, ``samples``, ``stage``
and cost columns summing every request the row took.
"""

from __future__ import annotations

import datetime as dt
import math
import secrets
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import polars as pl
from pydantic import ValidationError

from pipeline.answers.votes import majority, mean_confidence, sample_overrides, voting_key
from pipeline.errors import SpecError
from pipeline.job.spec import JobSpec, ModelSection, PricingSection, PromptSection, output_format
from pipeline.job.stages import EscalationSection, VotesSection
from pipeline.job.stages import uses_stages as _named_stages
from pipeline.options import RunOptions
from pipeline.records import RunSummary, RunTally, Selection, Status, StopReason, exit_code_for
from pipeline.tables import storage
from pipeline.tables.writer import atomic_path

#: Output columns summed over a row's requests (every sample, then the escalated request).
SUMMED = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "reasoning_tokens",
    "cached_tokens",
    "credits_used",
    "usd_spent",
    "attempts",
    "unconfirmed_attempts",
)
FIRST, ESCALATED = "first", "escalated"


def uses_stages(spec: JobSpec) -> bool:
    """Whether the job needs more than one plain run: k > 1 samples, or an escalation."""
    return _named_stages(spec.votes, spec.escalation)


def stage_dir(spec: JobSpec) -> Path:
    return spec.job.output.with_name(spec.job.output.name + ".votes")


def _votes(spec: JobSpec) -> VotesSection:
    return spec.votes or VotesSection()


def _derived(spec: JobSpec, output: Path, model: dict[str, Any], prompt: dict[str, Any], where: str) -> JobSpec:
    """The job with another output (local, under ``stage_dir``) and some request settings overridden."""
    try:
        model_values = spec.model.model_dump(by_alias=True)
        extra = {**model_values.get("extra", {}), **model.get("extra", {})}
        new_model = ModelSection.model_validate({**model_values, **model, "extra": extra})
        new_prompt = PromptSection.model_validate({**spec.prompt.model_dump(by_alias=True), **prompt})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise SpecError(f"{spec.source or '<job>'}: {where}.{loc}: {first['msg']}") from None
    job = spec.job.model_copy(
        update={"output": output, "ledger": spec.ledger_path, "run_output": None, "batch_output": None}
    )
    derived = spec.model_copy(
        update={"job": job, "model": new_model, "prompt": new_prompt, "votes": None, "escalation": None}
    )
    derived._objects = {k: v for k, v in spec.objects.items() if k == "input"}  # stage outputs stay local
    return derived


def sample_specs(spec: JobSpec) -> list[JobSpec]:
    """One job per sample: sample 0 is the job's own request; sample i adds its seed (``votes``)."""
    votes = _votes(spec)
    if votes.samples > 1 and spec.model.temperature == 0 and votes.temperature is None:
        raise SpecError(
            f"{spec.source or '<job>'}: votes.samples = {votes.samples} with model.temperature = 0: greedy samples "
            "agree by construction; raise model.temperature or set votes.temperature"
        )
    if spec.job.input_format != "table":
        raise SpecError(f"{spec.source or '<job>'}: [votes] and [escalation] need job.input_format = 'table'")
    for key in ("run_output", "batch_output"):
        if getattr(spec.job, key) is not None:
            raise SpecError(
                f"{spec.source or '<job>'}: job.{key} is not written for a job with [votes] or [escalation]"
            )
    _check_stage_columns(spec)
    if votes.samples == 1:
        return [spec]
    return [
        _derived(
            spec, stage_dir(spec) / f"sample-{i}.parquet", sample_overrides(votes, spec.model.seed, i), {}, "votes"
        )
        for i in range(votes.samples)
    ]


def escalation_spec(spec: JobSpec, *, every_row: bool = False) -> JobSpec | None:
    """The stronger setting's job over ``stage_dir/escalate-input.parquet`` (written by ``run_stages``), or
    over the job's own input with ``every_row`` (what ``plan`` prices)."""
    esc = spec.escalation
    if esc is None:
        return None
    if esc.when_field is not None:
        _check_field(spec, esc.when_field)
    derived = _derived(spec, stage_dir(spec) / "escalated.parquet", esc.model, esc.prompt, "escalation")
    derived = _priced(spec, derived, esc)
    if every_row:
        return derived
    job = derived.job.model_copy(update={"input": stage_dir(spec) / "escalate-input.parquet", "delimiter": None})
    out = derived.model_copy(update={"job": job})
    out._objects = {}
    return out


def _priced(spec: JobSpec, derived: JobSpec, esc: EscalationSection) -> JobSpec:
    """The escalation's price: the job's ``[pricing]`` with ``[escalation.pricing]`` over it. A stronger
    model priced with the job's table would make the budget and the cost columns wrong, so a changed
    ``model.name`` in a job with ``[pricing]`` needs ``[escalation.pricing]``."""
    if esc.pricing:
        try:
            pricing = PricingSection.model_validate(
                {**(spec.pricing.model_dump() if spec.pricing else {}), **esc.pricing}
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise SpecError(f"{spec.source or '<job>'}: escalation.pricing.{loc}: {first['msg']}") from None
        out = derived.model_copy(update={"pricing": pricing})
        out._objects = dict(derived.objects)
        return out
    if spec.pricing is not None and derived.model.name != spec.model.name:
        raise SpecError(
            f"{spec.source or '<job>'}: escalation.model.name = {derived.model.name!r} would be priced with the "
            f"job's [pricing] (for {spec.model.name!r}): set [escalation.pricing] input_per_million and "
            "output_per_million for it"
        )
    return derived


def check_stages(spec: JobSpec, selection: Selection) -> None:
    """Everything the stages need, checked before the first sample is paid: the escalation's own request
    settings against the input (its templates' columns, a price for a budget) and the input's column names
    against the columns the stages write."""
    from pipeline.requests.prepare import prepare

    esc_spec = escalation_spec(spec, every_row=True)
    p = prepare(esc_spec if esc_spec is not None else spec, selection, read_everything=False)
    for column in p.table.columns:
        if column in STAGE_COLUMNS or column.startswith("agreement_"):
            raise SpecError(
                f"{spec.source or '<job>'}: the input column {column!r} is one a job with [votes] or [escalation] "
                "writes itself: rename it in the input"
            )


#: Columns a job in stages adds to its output (plus ``agreement_<field>`` per schema field).
STAGE_COLUMNS = ("agreement", "samples", "stage")


def _check_stage_columns(spec: JobSpec) -> None:
    """A schema field whose column would be one the stages write is refused before anything is sent: the
    stage's column would silently replace the answer's."""
    from pipeline.requests.prepare import load_schema

    schema = load_schema(spec)
    prefix = spec.output.column_prefix
    for name in (schema or {}).get("properties", {}):
        column = prefix + name
        if column in STAGE_COLUMNS or column.startswith("agreement_"):
            raise SpecError(
                f"{spec.source or '<job>'}: the schema field {name!r} would be written as column {column!r}, "
                "which a job with [votes] or [escalation] writes itself; set output.column_prefix"
            )


def _check_field(spec: JobSpec, name: str) -> None:
    """``when_field`` must be a top-level property of the output schema: said before anything is sent."""
    from pipeline.requests.prepare import load_schema

    schema = load_schema(spec)
    if schema is None:
        if spec.model.tools is None:  # a forced function's parameters are checked once its output exists
            raise SpecError(f"{spec.source or '<job>'}: escalation.when_field needs output.schema (its fields)")
        return
    fields = list(schema.get("properties", {}))
    if name not in fields:
        raise SpecError(
            f"{spec.source or '<job>'}: escalation.when_field {name!r} is not a field of the output schema {fields}"
        )


def _sum(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def field_columns(frame: pl.DataFrame) -> list[str]:
    """A schema job's typed field columns: those after ``request_hash`` (none for a text job)."""
    return frame.columns[frame.columns.index("request_hash") + 1 :]


def combine(frames: list[pl.DataFrame]) -> pl.DataFrame:
    """The majority output of k sample outputs of the same rows (the rules: ``pipeline.answers.votes``)."""
    base = frames[0]
    if any(f.height != base.height or f.columns != base.columns for f in frames):
        # Every sample is written from the same input and selection: a mismatch is a bug, not bad input.
        raise AssertionError("sample outputs differ in rows or columns: rerun the job")
    fields = field_columns(base)
    answer_cols = base.columns[base.columns.index("content") :]
    data = [{c: f.get_column(c).to_list() for c in answer_cols} for f in frames]
    k, n = len(frames), base.height
    out: dict[str, list[Any]] = {c: [] for c in answer_cols}
    agreement: list[float] = []
    by_field: dict[str, list[float]] = {f: [] for f in fields}
    # seedbatch's ``confidence`` (a schema field of that name is voted on as a field instead).
    confidence: list[float | None] | None = [] if "confidence" in answer_cols and "confidence" not in fields else None
    for r in range(n):
        valid = [d["status"][r] == "ok" for d in data]
        winners: dict[str, tuple[int | None, float]] = {}  # field -> (sample holding its majority, share)
        sure: list[float | None] = []  # per field (or the text): the mean confidence of its majority's voters
        if fields:
            for name in fields:
                keys = [voting_key(d[name][r]) for d in data]
                _, share, holder = majority(keys, valid)
                winners[name] = (holder, share)
                by_field[name].append(share)
                if confidence is not None and holder is not None:
                    voters = [valid[i] and keys[i] == keys[holder] for i in range(k)]
                    sure.append(mean_confidence([d["confidence"][r] for d in data], voters))
            # The row's other columns come from the earliest sample agreeing on every field, else the
            # earliest valid one; its fields are the majority's whichever sample holds them.
            agreeing = [
                i
                for i in range(k)
                if valid[i]
                and all(
                    voting_key(data[i][f][r]) == voting_key(data[h][f][r])
                    for f, (h, _) in winners.items()
                    if h is not None
                )
            ]
            src = agreeing[0] if agreeing else next((i for i in range(k) if valid[i]), 0)
            agreement.append(min((s for _, s in winners.values()), default=0.0))
        else:
            keys = [voting_key(d["content"][r]) for d in data]
            _, share, holder = majority(keys, valid)
            src = holder if holder is not None else 0
            agreement.append(share)
            if confidence is not None and holder is not None:
                voters = [valid[i] and keys[i] == keys[holder] for i in range(k)]
                sure.append(mean_confidence([d["confidence"][r] for d in data], voters))
        if confidence is not None:
            known = [c for c in sure if c is not None]
            confidence.append(min(known) if known else None)  # as doubtful as its most doubtful field
        for c in answer_cols:
            if c in SUMMED:
                out[c].append(_sum([d[c][r] for d in data]))
            elif c == "confidence" and confidence is not None:
                out[c].append(confidence[r])
            elif c in winners:
                holder = winners[c][0]
                out[c].append(data[holder if holder is not None else src][c][r])
            else:
                out[c].append(data[src][c][r])
    answers = pl.DataFrame(out, schema={c: base.schema[c] for c in answer_cols})
    extra: list[pl.Series] = [
        pl.Series("agreement", agreement, dtype=pl.Float64),
        *(pl.Series(f"agreement_{f}", by_field[f], dtype=pl.Float64) for f in fields),
        pl.Series("samples", [[d["content"][r] for d in data] for r in range(n)], dtype=pl.List(pl.String)),
        pl.Series("stage", [FIRST] * n, dtype=pl.String),
    ]
    return pl.concat(
        [base.select(base.columns[: base.columns.index("content")]), answers], how="horizontal"
    ).with_columns(extra)


def doubtful(frame: pl.DataFrame, esc: EscalationSection, prefix: str = "") -> list[int]:
    """Positions of the rows the escalation sends again: any one of its conditions (``when_*``) holds.

    ``when_field`` names a top-level field of the schema: rows where it is null or false (a row without
    a valid answer has every field null, so it is chosen too). ``when_confidence_below``: rows whose
    ``confidence`` is below it or null (no log-probabilities, or no valid answer).
    """
    chosen: list[int] = []
    agreement = frame.get_column("agreement").to_list() if "agreement" in frame.columns else [1.0] * frame.height
    below = esc.when_confidence_below
    if below is not None and "confidence" not in frame.columns:
        raise SpecError("escalation.when_confidence_below: the first stage's output has no confidence column")
    confidence = frame.get_column("confidence").to_list() if below is not None else []
    status = frame.get_column("status").to_list()
    field_values: list[Any] | None = None
    if esc.when_field is not None:
        name = prefix + esc.when_field
        if name not in frame.columns:
            raise SpecError(f"escalation.when_field {esc.when_field!r} is not a field of the output schema")
        field_values = frame.get_column(name).to_list()
    for r in range(frame.height):
        if status[r] in ("skipped", "too_long", "pending"):
            continue
        if (
            (esc.when_agreement_below is not None and agreement[r] < esc.when_agreement_below - 1e-9)
            or (below is not None and (confidence[r] is None or confidence[r] < below - 1e-9))
            or status[r] in esc.when_status
            or (field_values is not None and (field_values[r] is None or field_values[r] is False))
        ):
            chosen.append(r)
    return chosen


def apply_escalation(first: pl.DataFrame, positions: list[int], escalated: pl.DataFrame) -> pl.DataFrame:
    """``first`` with the escalated answers at ``positions``; their costs add to the first stage's."""
    answer_cols = [c for c in first.columns[first.columns.index("content") :] if c in escalated.columns]
    cols = {c: first.get_column(c).to_list() for c in answer_cols}
    stage = first.get_column("stage").to_list()
    new = {c: escalated.get_column(c).to_list() for c in answer_cols}
    for j, r in enumerate(positions):
        for c in answer_cols:
            cols[c][r] = _sum([cols[c][r], new[c][j]]) if c in SUMMED else new[c][j]
        stage[r] = ESCALATED
    return first.with_columns(
        [pl.Series(c, v, dtype=first.schema[c]) for c, v in cols.items()] + [pl.Series("stage", stage, dtype=pl.String)]
    )


def _with_stage_columns(frame: pl.DataFrame) -> pl.DataFrame:
    """A one-sample output given the columns a voted one has (every sample agrees with itself)."""
    fields = field_columns(frame)
    ok = frame.get_column("status") == "ok"
    one = pl.when(ok).then(1.0).otherwise(0.0)
    return frame.with_columns(
        one.alias("agreement"),
        *(one.alias(f"agreement_{f}") for f in fields),
        pl.concat_list(pl.col("content")).alias("samples"),
        pl.lit(FIRST).alias("stage"),
    )


def write_frame(frame: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = output_format(path.name)
    with atomic_path(path) as tmp:
        if fmt == "csv":
            # CSV holds no lists or structs: they are written as their JSON text, as ``writer`` does.
            nested = [c for c, t in frame.schema.items() if t.is_nested()]
            text = frame.with_columns(
                pl.Series(
                    c,
                    [None if v is None else orjson.dumps(v).decode() for v in frame.get_column(c).to_list()],
                    dtype=pl.String,
                )
                for c in nested
            )
            text.write_csv(tmp)
        elif fmt == "jsonl":
            frame.write_ndjson(tmp)
        else:
            frame.write_parquet(tmp)


def _add(total: RunTally, part: RunSummary) -> None:
    total.requests_sent += part.requests_sent
    total.retries += part.retries
    total.http_429 += part.http_429
    total.prompt_tokens += part.prompt_tokens
    total.completion_tokens += part.completion_tokens
    total.usd_spent += part.usd_spent
    total.credits_used += part.credits_used
    total.null_cells = max(total.null_cells, part.null_cells)
    for kind, n in part.errors_by_kind.items():
        total.errors_by_kind[kind] = total.errors_by_kind.get(kind, 0) + n
        total.error_examples.setdefault(kind, part.error_examples.get(kind, ""))
    if part.stopped_by is not None and total.stopped_by is None:
        total.stop(part.stopped_by, part.stop_reason or "")
    if part.rows_by_status.get(Status.PENDING):
        total.rows_by_status[Status.PENDING] = part.rows_by_status[Status.PENDING]


def run_stages(spec: JobSpec, options: RunOptions | None = None) -> RunSummary:
    """Run every sample, combine them, escalate the doubtful rows, write the job's output and manifest."""
    from pipeline.runner import run_job, write_manifest

    options = options or RunOptions()
    samples = sample_specs(spec)
    esc_spec = escalation_spec(spec)
    check_stages(spec, options.selection)  # before the first sample is paid
    started = time.time()
    run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)
    total = RunTally(job=spec.name, run_id=run_id, started_at=started)
    if esc_spec is not None and len(samples) == 1:  # the first stage needs an output of its own
        samples = [_derived(spec, stage_dir(spec) / "sample-0.parquet", {}, {}, "votes")]
    outputs: list[pl.DataFrame] = []
    for sample in samples:
        budgeted = _budgeted(sample, spec, total)
        if budgeted is None:
            return _finish(spec, total, write_manifest)
        part = run_job(budgeted, options)
        _add(total, part)
        total.rows_total = part.rows_total
        total.rows_from_ledger = max(total.rows_from_ledger, part.rows_from_ledger)
        total.rows_deduplicated = max(total.rows_deduplicated, part.rows_deduplicated)
        if total.stopped_by is not None or part.rows_by_status.get(Status.PENDING):
            return _finish(spec, total, write_manifest)  # the rerun resumes from the ledger
        outputs.append(pl.read_parquet(sample.job.output))
    frame = combine(outputs) if len(outputs) > 1 else _with_stage_columns(outputs[0])
    if esc_spec is not None and spec.escalation is not None:
        positions = doubtful(frame, spec.escalation, spec.output.column_prefix)
        if positions:
            first_answer = frame.columns.index("content")
            chosen = frame[positions].select(frame.columns[:first_answer])
            write_frame(chosen, esc_spec.job.input)
            budgeted = _budgeted(esc_spec, spec, total)
            if budgeted is None:
                return _finish(spec, total, write_manifest)
            part = run_job(budgeted, replace(options, selection=Selection()))
            _add(total, part)
            if total.stopped_by is not None or part.rows_by_status.get(Status.PENDING):
                return _finish(spec, total, write_manifest)
            frame = apply_escalation(frame, positions, pl.read_parquet(esc_spec.job.output))
    write_frame(frame, spec.job.output)
    if "output" in spec.objects:  # an object output: its local copy is uploaded whole, as a plain run does
        storage.upload(spec.job.output, spec.objects["output"])
    total.output_path = spec.output_location
    total.output_action = "rebuilt"
    total.rows_by_status = dict(frame.get_column("status").value_counts().iter_rows())
    return _finish(spec, total, write_manifest)


def _budgeted(stage: JobSpec, spec: JobSpec, total: RunTally) -> JobSpec | None:
    """The stage with what is left of the job's ``max_cost_usd`` (one budget for every stage of the run);
    None, the run stopped as over budget, when nothing is left."""
    cap = spec.limits.max_cost_usd
    if cap is None:
        return stage
    left = cap - total.usd_spent
    if left <= 0:
        total.stop(StopReason.BUDGET, f"budget: ${total.usd_spent:.4f} spent of limits.max_cost_usd = {cap}")
        total.rows_by_status["pending"] = max(total.rows_total, 1)  # the rest waits for the next run
        return None
    out = stage.model_copy(update={"limits": stage.limits.model_copy(update={"max_cost_usd": left})})
    out._objects = dict(stage.objects)
    return out


def _finish(spec: JobSpec, total: RunTally, write_manifest: Any) -> RunSummary:
    total.ended_at = time.time()
    total.exit_code = exit_code_for(total)
    try:
        total.manifest_path = str(write_manifest(spec, total))
    except OSError:
        total.manifest_path = None
    return total.snapshot()


def escalation_share(spec: JobSpec) -> tuple[int, int] | None:
    """(doubtful rows, rows answered) in the first stage's outputs as they stand; None before any."""
    if spec.escalation is None:
        return None
    paths = [s.job.output for s in sample_specs(spec)]
    if len(paths) == 1:
        paths = [stage_dir(spec) / "sample-0.parquet"]
    if not all(p.exists() for p in paths):
        return None
    frames = [pl.read_parquet(p) for p in paths]
    if len({f.height for f in frames}) != 1:
        return None
    frame = combine(frames) if len(frames) > 1 else _with_stage_columns(frames[0])
    answered = frame.filter(~pl.col("status").is_in(["pending", "skipped", "too_long"])).height
    if answered == 0 or math.isnan(answered):
        return None
    return len(doubtful(frame, spec.escalation, spec.output.column_prefix)), answered
