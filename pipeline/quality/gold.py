"""The right answers beside the answers: one frame with, per scored field, an answer and a gold column.

Checked before a run sends anything (``check``) and again when an output is evaluated (``pair``): a
missing gold file, a gold column that is not there, a field the schema does not have, or a gold file
without the id column is one ``SpecError`` line, exit 2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.errors import InputError, SpecError
from pipeline.job.evaluation import EvaluationSpec
from pipeline.job.spec import JobSpec

#: The output column holding a text answer.
TEXT_ANSWER = "content"
#: Column names the paired frame gives each field: ``<field>__answer`` and ``<field>__gold``.
ANSWER_SUFFIX, GOLD_SUFFIX = "__answer", "__gold"


@dataclass(frozen=True, slots=True)
class Field:
    """One scored field: its output column, its gold column and its kind (how it is scored)."""

    name: str
    answer_column: str
    gold_column: str
    kind: str
    """``enum``, ``boolean``, ``number``, ``string`` (from the schema; ``string`` for a text answer)."""


def settings(spec: JobSpec) -> EvaluationSpec:
    evaluation = spec.evaluation
    if evaluation is None:
        raise SpecError(f"{spec.source or 'the job'} has no [evaluation] section: name the right answers there")
    return evaluation


def gold_path(spec: JobSpec, evaluation: EvaluationSpec) -> Path | None:
    """The gold file, a relative path read beside the job file as the job's other paths are."""
    if evaluation.gold_file is None:
        return None
    path = Path(evaluation.gold_file).expanduser()
    if not path.is_absolute() and spec.source is not None:
        path = spec.source.parent / path
    return path


def _schema(spec: JobSpec) -> dict[str, Any] | None:
    schema = spec.output.schema_
    if schema is None or isinstance(schema, dict):
        return schema
    try:
        loaded: dict[str, Any] = json.loads(Path(schema).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SpecError(f"output.schema {schema}: cannot read it for the evaluation ({exc})") from None
    return loaded


def _kind(prop: dict[str, Any]) -> str:
    if prop.get("enum"):
        return "enum"
    kind = prop.get("type")
    kinds = set(kind) if isinstance(kind, list) else {kind}
    if "boolean" in kinds:
        return "boolean"
    if kinds & {"integer", "number"}:
        return "number"
    return "string"


def fields(spec: JobSpec) -> list[Field]:
    """The scored fields, checked against the job's output format and schema."""
    evaluation = settings(spec)
    where = f"{spec.source or 'job'}: evaluation"
    if spec.output.format == "text" and spec.model.tool_choice is None:
        if evaluation.gold_column is None:
            raise SpecError(f"{where}.fields: a text job has one answer; name its gold column with gold_column")
        return [Field(TEXT_ANSWER, TEXT_ANSWER, evaluation.gold_column, "string")]
    if evaluation.gold_column is not None:
        raise SpecError(f'{where}.gold_column: a schema job scores fields; write fields = {{ <field> = "<column>" }}')
    schema = _schema(spec) or {}
    properties = schema.get("properties") or {}
    out = []
    for name, gold in evaluation.fields.items():
        prop = properties.get(name)
        if not isinstance(prop, dict):
            known = ", ".join(properties) or "none"
            raise SpecError(f"{where}.fields.{name}: not a top-level property of output.schema (it has: {known})")
        out.append(Field(name, spec.output.column_prefix + name, gold, _kind(prop)))
    return out


def read_table(path: Path, what: str) -> pl.DataFrame:
    """A Parquet, CSV or JSONL file read whole (gold files and outputs are a run's size, not an input's)."""
    if not path.exists():
        raise SpecError(f"{what} {path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pl.read_parquet(path)
        if suffix == ".csv":
            return pl.read_csv(path, infer_schema_length=10_000)
        if suffix in (".jsonl", ".ndjson"):
            return pl.read_ndjson(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(f"{what} {path}: cannot read it ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    raise SpecError(f"{what} {path}: end the name in .parquet, .csv or .jsonl")


def _columns(path: Path, what: str, separator: str = ",") -> list[str] | None:
    """The file's column names; None for an input this module does not read (compressed, another
    encoding): the run's reader checks that file, and the evaluation reads the columns from the output."""
    if not path.exists():
        raise SpecError(f"{what} {path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return list(pl.read_parquet_schema(path))
        if suffix in (".jsonl", ".ndjson"):
            return read_table(path, what).columns
        if suffix in (".csv", ".tsv"):
            return pl.read_csv(path, n_rows=0, infer_schema=False, separator=separator).columns
    except (pl.exceptions.PolarsError, OSError, InputError):
        return None
    return None


def check(spec: JobSpec) -> None:
    """Everything the evaluation needs, checked before a request is sent."""
    evaluation = settings(spec)
    scored = fields(spec)
    where = f"{spec.source or 'job'}: evaluation"
    path = gold_path(spec, evaluation)
    if path is not None:
        if spec.job.id_column is None:
            raise SpecError(f"{where}.gold_file is joined on job.id_column: set job.id_column")
        columns, what = _columns(path, "evaluation.gold_file"), f"gold_file {path}"
        if columns is None:
            raise SpecError(f"{where}.gold_file {path}: cannot read its columns (is it a valid {path.suffix} file?)")
        if spec.job.id_column not in columns:
            raise SpecError(f"{where}.gold_file {path} has no {spec.job.id_column!r} column (job.id_column)")
    elif "input" in spec.objects:  # an object input is fetched when the run starts: its columns are checked then
        return
    else:
        tab = "\t" if Path(spec.job.input).suffix.lower() == ".tsv" else ","
        columns = _columns(Path(spec.job.input), "job.input", spec.job.delimiter or tab)
        what = f"input {spec.job.input}"
        if columns is None:
            return
    for f in scored:
        if f.gold_column not in columns:
            has = ", ".join(columns)
            raise SpecError(f"{where}: gold column {f.gold_column!r} is not in the {what} (it has: {has})")


def pair(spec: JobSpec, output: pl.DataFrame) -> tuple[pl.DataFrame, list[Field]]:
    """The output with each field's answer and gold side by side (``<field>__answer``, ``<field>__gold``)."""
    evaluation = settings(spec)
    scored = fields(spec)
    path = gold_path(spec, evaluation)
    id_column = spec.job.id_column
    wanted = [f.gold_column for f in scored]
    if path is not None:
        assert id_column is not None, "check() demands job.id_column with a gold file"
        gold = read_table(path, "evaluation.gold_file")
        source = f"gold_file {path}"
    elif all(c in output.columns for c in wanted):
        gold, source = output, "output"
    else:
        gold = read_table(Path(spec.job.input), "job.input")
        source = f"input {spec.job.input}"
    missing = [c for c in wanted if c not in gold.columns]
    if missing:
        raise SpecError(f"evaluation: gold column {missing[0]!r} is not in the {source}")
    for f in scored:
        if f.answer_column not in output.columns:
            raise InputError(f"the output has no {f.answer_column!r} column to score (was it written by this job?)")
    answers = output.select(
        *(pl.col(f.answer_column).alias(f.name + ANSWER_SUFFIX) for f in scored),
        *(c for c in ("status", "usd_spent", "stage") if c in output.columns),
        *([pl.col(id_column)] if id_column and id_column in output.columns else []),
    )
    golds = gold.select(pl.col(f.gold_column).alias(f.name + GOLD_SUFFIX) for f in scored)
    if gold is output:
        return pl.concat([answers, golds], how="horizontal"), scored
    if id_column is not None and id_column in gold.columns and id_column in output.columns:
        keyed = pl.concat([gold.select(pl.col(id_column).cast(pl.String)), golds], how="horizontal")
        keyed = keyed.unique(id_column, keep="first", maintain_order=True)
        return answers.with_columns(pl.col(id_column).cast(pl.String)).join(keyed, on=id_column, how="left"), scored
    if path is not None:
        raise InputError(f"the output has no {id_column!r} column (job.id_column) to join the gold file on")
    if gold.height != output.height:
        raise InputError(
            f"the output has {output.height} rows but the input {gold.height}: evaluate the whole output, or give a "
            "gold_file joined on job.id_column"
        )
    return pl.concat([answers, golds], how="horizontal"), scored
