"""``seedbatch init INPUT``: a commented starter job for an input file, ready to ``plan``.

The input is opened the way a run opens it (so a file that cannot run fails here, with the same line),
its columns are listed in the job with their types, and the prompt is chosen from what the file is: an
OpenAI Batch input file (``custom_id`` and ``body`` on each line) gets ``job.input_format =
"openai_batch"``; a column of message lists gets ``prompt.messages_column``; anything else a ``{column}``
user template of its text columns. Paths in the job are written relative to the job file, as every
job's are. Nothing existing is overwritten without ``force``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import SpecError
from pipeline.job.spec import DEFAULT_MODEL
from pipeline.tables.reader import COMPRESSED, DelimiterGuess, open_input

#: Columns put in the user template at most; the rest are listed in a comment.
TEMPLATE_COLUMNS = 8
#: Characters that cannot appear in a ``{column}`` placeholder (see ``templates.parse_template``).
_NOT_PLACEABLE = set("{}")
_MESSAGE_NAMES = ("messages", "conversation", "conversations", "chat", "dialog", "dialogue")


@dataclass
class Starter:
    """What ``init`` wrote."""

    job: Path
    schema: Path | None
    kind: str
    """``openai_batch``, ``messages`` or ``template``: how the prompt is made."""
    columns: dict[str, str] = field(default_factory=dict)


def table_stem(path: Path) -> str:
    """``reviews`` for ``reviews.csv`` and for ``reviews.csv.gz``: the name a job for it is given."""
    name = path.name
    if Path(name).suffix.lower() in COMPRESSED:
        name = Path(name).stem
    return Path(name).stem


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def _q(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a TOML basic string


def _id_column(columns: dict[str, str]) -> str | None:
    for name in columns:
        low = name.lower()
        if low in ("id", "uuid", "key") or low.endswith(("_id", "-id")):
            return name
    return None


def _messages_column(columns: dict[str, str]) -> str | None:
    for name, dtype in columns.items():
        if dtype.startswith("List(Struct") and "'role'" in dtype:
            return name
    for name, dtype in columns.items():
        if name.lower() in _MESSAGE_NAMES and dtype.startswith(("String", "List")):
            return name
    return None


def _prompt_lines(input_path: Path, columns: dict[str, str], id_column: str | None, messages: str | None) -> list[str]:
    """The ``[prompt]`` section: the message list column, or a template of the first placeable columns."""
    lines: list[str] = []
    lines.append("[prompt]")
    lines.append('system = "You are a careful assistant. Answer briefly."')
    if messages is not None:
        lines.append("# Each row's whole message list; the system text above is joined to a row's own system message.")
        lines.append(f"messages_column = {_q(messages)}")
    else:
        usable = [
            c
            for c, t in columns.items()
            if c != id_column and not (set(c) & _NOT_PLACEABLE) and not t.startswith(("List", "Struct", "Binary"))
        ]
        chosen = usable[:TEMPLATE_COLUMNS] or [c for c in columns if not (set(c) & _NOT_PLACEABLE)][:1]
        if not chosen:
            raise SpecError(
                f"{input_path}: no column can be a {{column}} placeholder (every name holds a brace); "
                "rename a column or write the job by hand"
            )
        template = "\n".join(f"{c}: {{{c}}}" for c in chosen) if len(chosen) > 1 else f"{{{chosen[0]}}}"
        lines.append(f"user = {_q(template)}")
        left = [c for c in columns if c not in chosen and c != id_column]
        if left:
            lines.append(f"# Not in the template: {', '.join(left)}")
    return lines


def _write_schema_stub(schema_path: Path) -> None:
    """A one-field schema to edit: its top-level properties become the output's typed columns."""
    schema_path.parent.mkdir(parents=True, exist_ok=True)
    stub = {
        "type": "object",
        "properties": {"answer": {"type": "string", "description": "Replace with the fields you want back."}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    schema_path.write_text(json.dumps(stub, indent=2) + "\n", encoding="utf-8")


def _output_lines(schema_path: Path, columns: dict[str, str], job_dir: Path) -> list[str]:
    """The ``[output]`` section of a job with a schema stub (a prefix when the input has an answer column)."""
    lines: list[str] = []
    taken = set(columns)
    prefix = "ans_" if "answer" in taken else ""
    lines += [
        "[output]",
        'format = "json_schema"',
        f"schema = {_q(_rel(schema_path, job_dir))}  # its top-level properties become typed output columns",
    ]
    if prefix:
        lines.append(f'column_prefix = "{prefix}"  # the input has an "answer" column already')
    lines.append("")
    return lines


def starter_job(input_path: Path, job_path: Path, *, schema: bool = False, force: bool = False) -> Starter:
    """Write ``job_path`` (and with ``schema`` a schema stub beside it, in ``schemas/``) for ``input_path``."""
    schema_path = job_path.parent / "schemas" / f"{job_path.stem}.json" if schema else None
    for path in (job_path, schema_path):
        if path is not None and path.exists() and not force:
            raise SpecError(f"{path}: already exists; choose another --job path or pass --force to overwrite it")
    delimiter = None
    try:
        table = open_input(input_path)
    except DelimiterGuess as guess:  # a semicolon or tab file named .csv: say so in the job
        delimiter = guess.delimiter
        table = open_input(input_path, delimiter=delimiter)
    columns = dict(table.dtypes)
    job_dir = job_path.parent
    output = Path("out") / f"{job_path.stem}.parquet"
    lines = [
        f"# Starter job for {input_path.as_posix()}, written by `seedbatch init`: edit, then",
        f"#   seedbatch plan {job_path.as_posix()}                   # rows, tokens, cost; sends nothing",
        f"#   seedbatch run  {job_path.as_posix()} --endpoint local  # a dry run on the built-in local API",
        f"#   seedbatch run  {job_path.as_posix()} --limit 20        # a first look at real answers",
        "# Paths are relative to this file. Every key is listed in README 'Jobs'.",
        f"# Input columns ({table.rows:,} rows):",
        *(f"#   {name:<24} {dtype}" for name, dtype in columns.items()),
        "",
        "[job]",
        f"input = {_q(_rel(input_path, job_dir))}",
    ]
    is_batch = table.format == "ndjson" and "custom_id" in columns and "body" in columns
    messages = None if is_batch else _messages_column(columns)
    if is_batch:
        kind = "openai_batch"
        lines += [
            "# An OpenAI Batch input file: each line's body is the request, custom_id the row id.",
            'input_format = "openai_batch"',
        ]
    else:
        kind = "messages" if messages else "template"
    lines.append(f"output = {_q(_rel(output, job_dir))}")
    if is_batch:
        batch_out = Path("out") / f"{job_path.stem}_output.jsonl"
        lines.append(f"batch_output = {_q(_rel(batch_out, job_dir))}  # OpenAI Batch-style results, beside the Parquet")
    if delimiter is not None:
        lines.append(f"delimiter = {_q(delimiter)}  # the file's field separator")
    id_column = None if is_batch else _id_column(columns)
    if id_column is not None:
        lines.append(f"id_column = {_q(id_column)}")
    lines += [
        "",
        "[model]",
        f"name = {_q(DEFAULT_MODEL)}",
        "max_tokens = 256"
        if not is_batch
        else "# max_tokens, temperature, ...: set here they win over each line's body",
        "",
    ]
    if not is_batch:
        lines += _prompt_lines(input_path, columns, id_column, messages)
        lines.append("")
    if schema_path is not None:
        lines += _output_lines(schema_path, columns, job_dir)
    lines += [
        "[limits]",
        "# rpm = 600    # ceilings; unset, the run paces to the server's rate-limit headers",
        "# max_cost_usd = 1.0",
        "",
        "[endpoint]",
        'preset = "aimlapi"   # key from $AIMLAPI_API_KEY; --endpoint local for a dry run without one',
        "",
    ]
    job_path.parent.mkdir(parents=True, exist_ok=True)
    if schema_path is not None:
        _write_schema_stub(schema_path)
    job_path.write_text("\n".join(lines), encoding="utf-8")
    return Starter(job_path, schema_path, kind, columns)
