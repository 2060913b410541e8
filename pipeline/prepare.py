"""Everything that can be known before the first request, checked in one place: ``prepare``.

Job, schema, input, columns, templates, output paths, key: each problem is a one-line error (exit 2)
raised before the lock, the ledger or the network are touched. Then one streaming pass parses every
selected row (``read_all``), so a broken line near the end of the input stops the run before anything
is paid for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import media, schema_types
from pipeline.costs import Price, price_for
from pipeline.errors import SpecError
from pipeline.prompts import Renderer
from pipeline.reader import InputTable, check_id_column, open_input, read_frames, read_rows, selected_rows
from pipeline.records import Request, RowRange, Selection
from pipeline.spec import JobSpec
from pipeline.writer import OUTPUT_COLUMNS, check_output_path


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
    row_range: RowRange | None = None
    """Only these positions among the selected rows (one shard of a Ray run); None: all of them."""
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
    table = open_input(spec.job.input, encoding=spec.job.encoding)
    builder = media.MediaBuilder(spec.media) if (spec.media.image_columns or spec.media.video_columns) else None
    renderer = Renderer(spec, schema, builder.cells if builder else None)
    renderer.check_columns(table.columns, f"{spec.source or 'job'}: prompt")
    if spec.job.id_column and spec.job.id_column not in table.columns:
        raise SpecError(f"{spec.source or 'job'}: job.id_column {spec.job.id_column!r} is not an input column")
    if spec.job.id_column and not spec.job.dedupe:
        check_id_column(table, spec.job.id_column)
    if builder is not None:
        builder.check_columns(table.columns, str(spec.source or "job"))
        if spec.media.strict_inputs:  # stat + 16 bytes per file, so a bad file stops the run before any request
            size = min(spec.job.chunk_rows, media.CHUNK_ROWS)
            builder.require_clean(read_rows(table, selection, size, builder.column_names, spec.job.id_column))
    check_distinct_files(spec)
    check_output_path(spec.job.output, table.columns)
    if schema is not None:
        schema_types.check_column_clash(
            schema,
            spec.output.column_prefix,
            [*table.columns, *OUTPUT_COLUMNS],
            str(spec.output.schema_) if not isinstance(spec.output.schema_, dict) else "output.schema",
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
    if read_everything:
        read_all(p)
    return p


def read_all(p: Prepared) -> None:
    """Parse every selected row once before anything is paid for (bounded memory: one chunk at a time).

    Every column, not only the prompt's: the output is written from all of them, and a broken line in
    a column the prompt does not use must stop the run now, not after every answer was paid for.
    Rendering cannot fail on a parsed row: every per-row problem (bad media, empty placeholders, over
    the context) is that row's outcome, not the run's.
    """
    if p.table.format != "parquet":
        return  # open_input already parsed every line of a CSV or JSONL file (types, row count, bad lines)
    for _ in read_frames(p.table, p.selection, p.spec.job.chunk_rows):
        pass


def check_distinct_files(spec: JobSpec) -> None:
    """The output, ledger and manifest must not be the input (or each other): writing one would destroy it."""
    written = {"job.output": spec.job.output, "the ledger": spec.ledger_path, "the manifest": spec.manifest_path}
    input_path = spec.job.input.resolve()
    for what, path in written.items():
        if path.resolve() == input_path:
            raise SpecError(f"{path}: {what} is the input file; writing it would destroy the input: change job.output")
    if spec.ledger_path.resolve() == spec.job.output.resolve():
        raise SpecError(f"{spec.ledger_path}: job.ledger is job.output; give the ledger its own file")


def iter_requests(p: Prepared, chunk_rows: int | None = None) -> Iterator[list[Request]]:
    columns = [*p.renderer.fields, *p.spec.media.image_columns, *p.spec.media.video_columns]
    size = chunk_rows or p.spec.job.chunk_rows
    if p.spec.media.image_columns or p.spec.media.video_columns:
        size = min(size, media.CHUNK_ROWS)  # media bytes live in the request bodies: keep few chunks of them
    for rows in read_rows(p.table, p.selection, size, columns, p.spec.job.id_column, p.row_range, p.only_rows):
        yield [p.renderer.render(r) for r in rows]
