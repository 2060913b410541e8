"""An output scored against its right answers: one JSON-ready document, per field and per stage.

A row counts when it has a right answer (a null gold value scores nothing, and is counted as
``n_without_gold``). Its answer is usable when the row's status is ``ok`` and the field is not null;
any other row is wrong and sits in the ``(no answer)`` column. Cost is the output's ``usd_spent`` over
the scored rows (every sample and attempt of a row is in it), so ``cost_per_correct_usd`` is what one
right answer cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.errors import InputError, SeedbatchError, SpecError
from pipeline.job.evaluation import EvaluationSpec
from pipeline.job.spec import JobSpec
from pipeline.quality import gold, metrics
from pipeline.quality.gold import ANSWER_SUFFIX, GOLD_SUFFIX, Field, pair, read_table

#: The output column that says which stage answered a row (votes/escalation), when it has one.
STAGE_COLUMN = "stage"


def _text(value: Any, kind: str) -> str:
    """A value as the class name it is counted under: ``true``/``false`` for booleans, else its text."""
    if isinstance(value, bool) or kind == "boolean":
        text = str(value).strip().lower()
        return {"1": "true", "0": "false", "yes": "true", "no": "false"}.get(text, text)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def score_field(frame: pl.DataFrame, f: Field, evaluation: EvaluationSpec) -> dict[str, Any]:
    """The metrics of one field over ``frame`` (a ``pair`` frame, possibly one stage's rows)."""
    gold_values = frame.get_column(f.name + GOLD_SUFFIX).to_list()
    answer_values = frame.get_column(f.name + ANSWER_SUFFIX).to_list()
    statuses = frame.get_column("status").to_list() if "status" in frame.columns else ["ok"] * frame.height
    costs = frame.get_column("usd_spent").to_list() if "usd_spent" in frame.columns else [0.0] * frame.height
    keep = [i for i, g in enumerate(gold_values) if g is not None and not (isinstance(g, float) and math.isnan(g))]
    usable = [answer_values[i] if statuses[i] == "ok" else None for i in keep]
    cost = float(sum(costs[i] or 0.0 for i in keep))
    result: dict[str, Any] = {
        "kind": f.kind,
        "answer_column": f.answer_column,
        "gold_column": f.gold_column,
        "n": len(keep),
        "n_without_gold": frame.height - len(keep),
    }
    if f.kind == "number":
        truth_numbers = [_number(gold_values[i]) for i in keep]
        answers_numbers = [_number(a) for a in usable]
        pairs = [(t, a) for t, a in zip(truth_numbers, answers_numbers, strict=True) if t is not None]
        errors = metrics.number_errors([t for t, _ in pairs], [a for _, a in pairs])
        correct = errors.exact
        result.update(
            n_without_answer=errors.n_without_answer,
            correct=correct,
            accuracy=correct / errors.n if errors.n else 0.0,
            mean_absolute_error=errors.mean_absolute_error,
            median_absolute_error=errors.median_absolute_error,
        )
    else:
        truth = [_text(gold_values[i], f.kind) for i in keep]
        answers = [None if a is None else _text(a, f.kind) for a in usable]
        strings = metrics.match_strings(truth, answers)
        result.update(n_without_answer=strings.n_without_answer, correct=strings.exact, accuracy=strings.exact_match)
        if f.kind == "string":
            result.update(exact_match=strings.exact_match, normalised_match=strings.normalised_match)
        if f.kind != "string" or len(set(truth)) <= evaluation.max_classes:
            scores = metrics.classify(truth, answers)
            result.update(
                macro_f1=scores.macro_f1,
                classes={
                    label: {"precision": c.precision, "recall": c.recall, "f1": c.f1, "support": c.support}
                    for label, c in scores.classes.items()
                },
                confusion={
                    "rows": scores.labels,
                    "columns": [*scores.labels, metrics.NO_ANSWER],
                    "matrix": scores.matrix,
                },
            )
    result.update(cost_usd=cost, cost_per_correct_usd=metrics.cost_per_correct(cost, result["correct"]))
    return result


def score(frame: pl.DataFrame, scored: list[Field], evaluation: EvaluationSpec) -> dict[str, Any]:
    """Every field over ``frame``, with the rows and cost they cover."""
    cost = float(frame.get_column("usd_spent").fill_null(0.0).sum()) if "usd_spent" in frame.columns else 0.0
    return {
        "rows": frame.height,
        "cost_usd": cost,
        "fields": {f.name: score_field(frame, f, evaluation) for f in scored},
    }


def evaluate(output_path: Path, spec: JobSpec, output: pl.DataFrame | None = None) -> dict[str, Any]:
    """The evaluation document of ``output_path`` (already read: ``output``) against ``spec``'s right answers."""
    frame = read_table(output_path, "output") if output is None else output
    evaluation = gold.settings(spec)
    paired, scored = pair(spec, frame)
    document: dict[str, Any] = {
        "output": str(output_path),
        "job_file": str(spec.source) if spec.source else None,
        **score(paired, scored, evaluation),
    }
    if STAGE_COLUMN in paired.columns:
        stages = [s for s in paired.get_column(STAGE_COLUMN).unique(maintain_order=True).to_list() if s is not None]
        document["stages"] = {
            str(stage): score(paired.filter(pl.col(STAGE_COLUMN) == stage), scored, evaluation) for stage in stages
        }
    return document


def job_of(output_path: Path) -> Path:
    """The job file that wrote ``output_path``, as its manifest (``<output>.manifest.json``) records it."""
    import orjson

    manifest = output_path.with_name(output_path.name + ".manifest.json")
    try:
        recorded = orjson.loads(manifest.read_bytes()).get("job_file")
    except FileNotFoundError:
        raise SpecError(f"{output_path}: no manifest beside it ({manifest.name}); name the job with --job") from None
    except (OSError, orjson.JSONDecodeError, AttributeError) as exc:
        raise SpecError(f"{manifest}: cannot read the job file it records ({exc}); name the job with --job") from None
    if not recorded:
        raise SpecError(f"{manifest} records no job file; name the job with --job")
    if not Path(recorded).exists():  # recorded as typed: a relative path means the folder the run started in
        raise SpecError(f"{manifest} records the job file {recorded}, which is not here; name the job with --job")
    return Path(recorded)


def evaluate_output(output: str, job: str | None) -> dict[str, Any]:
    """``seedbatch eval``'s library half: find the job, check it, read the output, score it. Sends nothing."""
    from pipeline.job.spec import expand_home, load_spec

    output_path = Path(expand_home(output))
    if not output_path.exists():
        raise InputError(f"{output}: no such output file (run the job first)")
    spec = load_spec(job if job is not None else job_of(output_path))
    gold.check(spec)
    return evaluate(output_path, spec)


def after_run(spec: JobSpec, log: Callable[[str, dict[str, Any]], None], as_json: bool) -> None:
    """``seedbatch run``'s closing evaluation of a job with ``[evaluation]``. A problem scoring it is logged,
    never raised: the run itself succeeded, and its exit code says so."""
    from rich.console import Console

    from pipeline.quality import terminal as tables

    try:
        document = evaluate(Path(spec.job.output), spec)
    except SeedbatchError as exc:
        log("evaluation_failed", {"message": str(exc)})
        return
    if as_json:
        log("evaluation", document)
    else:
        tables.print_document(document, Console(stderr=True))
