"""Everything that can be known before the first request, checked in one place: ``prepare``.

Job, schema, input, columns, templates, output paths, key: each problem is a one-line error (exit 2)
raised before the lock, the ledger or the network are touched. Then one streaming pass parses every
selected row (``read_all``), so a broken line near the end of the input stops the run before anything
is paid for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.answers.costs import Price, price_for
from pipeline.errors import InputError, SpecError
from pipeline.job import schema_types
from pipeline.job.spec import JobSpec
from pipeline.job.stages import asks_logprobs
from pipeline.records import Request, Selection
from pipeline.requests import media
from pipeline.requests.prompts import Renderer
from pipeline.requests.tools import Tools, answer_tool, job_tools
from pipeline.tables import storage
from pipeline.tables.reader import (
    InputTable,
    check_ids,
    open_input,
    read_frames,
    read_rows,
    selected_rows,
    selected_stop,
)
from pipeline.tables.writer import CEDED_COLUMNS, OUTPUT_COLUMNS, check_output_path


@dataclass
class Prepared:
    """Everything checked and built before the first request."""

    spec: JobSpec
    table: InputTable
    selection: Selection
    renderer: Renderer
    schema: dict[str, Any] | None
    price: Price | None
    api_key: str | None
    rows: int
    holds: Callable[[str], bool] | None = None
    """Only the requests whose hash this accepts (one shard of a Ray run); None: all of them."""
    tools: Tools | None = None
    """The functions every request sends; with one forced, ``schema`` is its parameters."""
    schema_source: str = "output.schema"
    """Where ``schema`` came from, for messages (a file, or a function in the tools file)."""
    warnings: list[str] | None = None
    """Things a person should know before paying (``plan`` prints them, ``run`` logs them once)."""
    only_rows: frozenset[int] | None = None
    """Only these row numbers are rendered and sent: an incremental run's changed rows (``incremental``)."""


def load_schema(spec: JobSpec) -> dict[str, Any] | None:
    raw = spec.output.schema_
    if raw is None:
        return None
    if isinstance(raw, dict):
        source, schema = "output.schema (inline)", raw
    else:
        source = str(raw)
        try:
            schema = json.loads(Path(raw).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SpecError(f"{raw}: schema file not found (output.schema)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SpecError(f"{raw}: schema is not valid JSON ({exc})") from None
    schema_types.check_schema(schema, strict=spec.output.strict and spec.output.format == "json_schema", source=source)
    return schema


def load_tools(spec: JobSpec, schema: dict[str, Any] | None) -> Tools | None:
    """The functions every request sends: the job's own (``model.tools``), or its schema as the ``tool`` dialect."""
    if spec.structured_output == "tool" and spec.output.format == "json_schema" and schema is not None:
        return answer_tool(spec.output.name, schema, spec.output.strict, _schema_source(spec))
    raw = spec.model.tools
    if raw is None:
        return None
    if isinstance(raw, Path):
        source = str(raw)
        try:
            raw = json.loads(raw.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SpecError(f"{source}: tools file not found (model.tools)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SpecError(f"{source}: tools file is not valid JSON ({exc})") from None
    else:
        source = "model.tools (inline)"
    job = str(spec.source or "job")
    return job_tools(raw, spec.model.tool_choice, spec.model.parallel_tool_calls, source=source, job=job)


def _schema_source(spec: JobSpec) -> str:
    raw = spec.output.schema_
    return "output.schema" if raw is None or isinstance(raw, dict) else str(raw)


def extra_warning(spec: JobSpec) -> list[str]:
    """``model.extra`` is sent as written: say once that nothing checked it."""
    if not spec.model.extra:
        return []
    keys = ", ".join(sorted(spec.model.extra))
    return [f"model.extra sends {keys} as written: unchecked by seedbatch (the server judges them)"]


def resolve_api_key(spec: JobSpec) -> str | None:
    """The key from ``api_key_file`` or the environment; never from a flag, never logged."""
    if spec.endpoint.api_key_file is not None:
        path = spec.endpoint.api_key_file
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SpecError(f"{path}: cannot read endpoint.api_key_file ({exc.strerror})") from None
        if not key:
            raise SpecError(f"{path}: endpoint.api_key_file is empty")
        return key
    key = os.environ.get(spec.api_key_env, "").strip()
    if not key and spec.key_required:
        raise SpecError(
            f"no API key: set the environment variable {spec.api_key_env} (or endpoint.api_key_file in the job)"
        )
    return key or None


def prepare(
    spec: JobSpec, selection: Selection | None = None, *, need_key: bool = True, read_everything: bool = True
) -> Prepared:
    """Every check that needs no network: input, columns, templates, schema, output path, key, every row.

    ``read_everything=False`` skips the parse of every row (a Ray shard: its driver did it already).
    """
    selection = selection or Selection()
    schema = load_schema(spec)
    storage.fetch_input(spec)
    with storage.objects_named(spec):  # errors about a local copy name the object the job names
        p = _prepare(spec, selection, schema, need_key=need_key, read_everything=read_everything)
    return p


def _prepare(
    spec: JobSpec, selection: Selection, schema: dict[str, Any] | None, *, need_key: bool, read_everything: bool
) -> Prepared:
    schema_source = _schema_source(spec)
    tool_set = load_tools(spec, schema)
    if tool_set is not None and tool_set.forced is not None and schema is None:
        # The forced function's arguments are the answer's document: its parameters make the typed columns.
        fn = tool_set.function(tool_set.forced)
        schema, schema_source = fn["parameters"], f"{tool_set.source}: function {tool_set.forced} parameters"
        schema_types.check_schema(schema, strict=bool(fn.get("strict")), source=schema_source)
    messages_column = "body" if spec.job.input_format == "openai_batch" else spec.prompt.messages_column
    table = open_input(
        spec.job.input,
        spec.job.encoding,
        [messages_column] if messages_column else [],
        spec.job.delimiter,
        spec.job.id_column if read_everything else None,
        _rows_to_check(selection) if read_everything else 0,
    )
    builder = media.MediaBuilder(spec.media) if (spec.media.image_columns or spec.media.video_columns) else None
    # Media inside message lists follow the [media] rules (size, formats), whatever columns are named.
    loader = media.MediaBuilder(spec.media).load if messages_column else None
    renderer = Renderer(spec, schema, builder.cells if builder else None, load_media=loader, tools=tool_set)
    renderer.check_columns(table.columns, f"{spec.source or 'job'}: prompt")
    if messages_column is not None:
        check_messages_type(table, messages_column)
        if spec.media.strict_inputs:
            require_clean_messages(spec, table, selection, schema)
    if spec.job.id_column and spec.job.id_column not in table.columns:
        raise SpecError(f"{spec.source or 'job'}: job.id_column {spec.job.id_column!r} is not an input column")
    if spec.job.id_column and read_everything:  # (a Ray shard: its driver checked them)
        batch = spec.job.input_format == "openai_batch"
        check_ids(table, spec.job.id_column, *([" in an OpenAI Batch input file"] if batch else []))
    if builder is not None:
        builder.check_columns(table.columns, str(spec.source or "job"))
        if spec.media.strict_inputs:  # stat + 16 bytes per file, so a bad file stops the run before any request
            size = min(spec.job.chunk_rows, media.CHUNK_ROWS)
            builder.require_clean(read_rows(table, selection, size, builder.column_names, spec.job.id_column))
    check_distinct_files(spec)
    # ``confidence`` is seedbatch's only when the job asks for the log-probabilities that fill it; else an
    # input column or a schema field of that name keeps it (``writer.CEDED_COLUMNS``).
    ours = CEDED_COLUMNS if asks_logprobs(spec.model.extra) else ()
    check_output_path(spec.job.output, table.columns, kept=ours)
    storage.check_output(spec)
    if schema is not None:
        schema_types.check_column_clash(
            schema,
            spec.output.column_prefix,
            [*table.columns, *(c for c in OUTPUT_COLUMNS if c not in CEDED_COLUMNS or c in ours)],
            schema_source,
        )
    price = price_for(spec)
    if spec.limits.max_cost_usd is not None and price is None:
        raise SpecError(
            f"{spec.source or 'job'}: limits.max_cost_usd needs a price for {spec.model.name!r}; add [pricing]"
        )
    if spec.endpoint.preset != "local" and not spec.base_url:
        raise SpecError(f"{spec.source or 'job'}: endpoint.base_url is not set")
    api_key = resolve_api_key(spec) if need_key and spec.base_url is not None else None
    p = Prepared(spec, table, selection, renderer, schema, price, api_key, selected_rows(table, selection))
    p.tools, p.schema_source, p.warnings = tool_set, schema_source, extra_warning(spec)
    if read_everything:
        read_all(p)
    return p


def _rows_to_check(selection: Selection) -> int | None:
    """The first rows a run reads (None: every row): those ``open_input``'s pass parses."""
    return selection.limit if selection.sample is None else None


def read_all(p: Prepared) -> None:
    """Parse every selected row once before anything is paid for (bounded memory: one chunk at a time).

    Every column, not only the prompt's: the output is written from all of them, and a broken line in
    a column the prompt does not use must stop the run now, not after every answer was paid for.
    Rendering cannot fail on a parsed row: every per-row problem (bad media, empty placeholders, over
    the context) is that row's outcome, not the run's.
    """
    if p.table.parsed_rows >= selected_stop(p.table, p.selection):
        return  # open_input's pass parsed them (every line of a CSV or JSONL file, the first rows of a Parquet one)
    for _ in read_frames(p.table, p.selection, p.spec.job.chunk_rows):
        pass


def require_clean_messages(
    spec: JobSpec, table: InputTable, selection: Selection, schema: dict[str, Any] | None
) -> None:
    """With ``media.strict_inputs``, any message list that cannot be sent stops the run before the first request.

    The rows are rendered with media checked by size and first bytes only (no file is read whole).
    """
    checker = Renderer(spec, schema, None, media.MediaBuilder(spec.media).check)
    checker.check_columns(table.columns, f"{spec.source or 'job'}: prompt")
    problems: list[str] = []
    count = 0
    size = min(spec.job.chunk_rows, media.CHUNK_ROWS)
    for rows in read_rows(table, selection, size, checker.fields, spec.job.id_column):
        for row in rows:
            ns = checker.render(row).not_sent
            if ns is not None and ns.error_kind == "messages":
                count += 1
                if len(problems) < media.SHOWN_PROBLEMS:
                    problems.append(ns.error)
    if count:
        more = f" (+{count - len(problems)} more)" if count > len(problems) else ""
        raise InputError(
            f"{count} row(s) hold messages that cannot be sent and media.strict_inputs is on; nothing was sent: "
            f"{'; '.join(problems)}{more}"
        )


def check_messages_type(table: InputTable, column: str) -> None:
    """A message column must hold lists (or their JSON text): any other type fails every row, so it fails the load."""
    dtype = table.dtypes.get(column, "")
    if dtype.startswith(("String", "List", "Array", "Null")) or dtype in ("str", "null"):
        return
    raise SpecError(
        f"{table.path}: column {column!r} is {dtype}; prompt.messages_column needs a list of {{role, content}} "
        "messages per row (a Parquet list<struct<role, content>> column, or the list as JSON text)"
    )


def check_distinct_files(spec: JobSpec) -> None:
    """The output, ledger and manifest must not be the input (or each other): writing one would destroy it."""
    written = {"job.output": spec.job.output, "the ledger": spec.ledger_path, "the manifest": spec.manifest_path}
    if spec.job.batch_output is not None:
        written["job.batch_output"] = spec.job.batch_output
    input_path = spec.job.input.resolve()
    for what, path in written.items():
        if path.resolve() == input_path:
            fix = what if what == "job.batch_output" else "job.output"
            raise SpecError(f"{path}: {what} is the input file; writing it would destroy the input: change {fix}")
    if spec.ledger_path.resolve() == spec.job.output.resolve():
        raise SpecError(f"{spec.ledger_path}: job.ledger is job.output; give the ledger its own file")


def iter_requests(
    p: Prepared, chunk_rows: int | None = None, *, first_chunk_rows: int | None = None
) -> Iterator[list[Request]]:
    """Rendered requests, one list per chunk of input rows.

    ``first_chunk_rows`` is for a caller that sends as it goes: the first chunk has that many rows and
    each next one twice as many, up to ``chunk_rows``. Its first requests then wait for rendering and
    a ledger lookup of a few rows, not of a whole chunk: that work holds the event loop, which would
    otherwise spend a whole chunk's worth of it before the first request and again before the second.
    """
    columns = [*p.renderer.fields, *p.spec.media.image_columns, *p.spec.media.video_columns]
    size = chunk_rows or p.spec.job.chunk_rows
    if p.spec.media.image_columns or p.spec.media.video_columns:
        size = min(size, media.CHUNK_ROWS)  # media bytes live in the request bodies: keep few chunks of them
    cut = first_chunk_rows if first_chunk_rows and first_chunk_rows < size else None
    for rows in read_rows(p.table, p.selection, size, columns, p.spec.job.id_column, only=p.only_rows):
        start = 0
        while start < len(rows):
            end = min(len(rows), start + cut) if cut else len(rows)
            piece, start = rows[start:end], end
            if cut:
                cut = cut * 2 if cut * 2 < size else None
            requests = [p.renderer.render(r) for r in piece]
            if p.holds is not None:  # a Ray shard renders every row to learn which requests are its own
                requests = [r for r in requests if p.holds(r.request_hash)]
            if requests:
                yield requests
