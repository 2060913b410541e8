"""Input tables in bounded chunks. Only this module and ``writer`` touch polars/pyarrow.

Rows are read twice per run, once to build requests and once to write the output, instead of being
held in memory: a 10M-row input then costs one chunk of memory, not ten million dicts.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.records import Row, RowRange, Selection

__all__ = ["FORMATS", "ROW_NUMBER", "InputTable", "RowRange", "Selection", "open_input", "read_frames", "read_rows"]

ROW_NUMBER = "__seedbatch_row"
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "ndjson", ".ndjson": "ndjson"}


@dataclass(frozen=True, slots=True)
class InputTable:
    """What the pipeline needs to know about an input before sending anything."""

    path: Path
    format: str
    columns: tuple[str, ...]
    dtypes: dict[str, str]
    rows: int


def _scan(path: Path, fmt: str) -> pl.LazyFrame:
    if fmt == "parquet":
        return pl.scan_parquet(path)
    if fmt == "csv":
        return pl.scan_csv(path, infer_schema_length=10_000, raise_if_empty=True)
    return pl.scan_ndjson(path, infer_schema_length=10_000)


def open_input(path: Path) -> InputTable:
    """Check the input exists, has a known format, parses, and has rows; return its shape."""
    if not path.exists():
        raise InputError(f"{path}: input file not found (set job.input or pass --input)")
    if path.is_dir():
        raise InputError(f"{path}: input is a directory; give one .parquet, .csv or .jsonl file")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: unknown input format {path.suffix!r}; use .parquet, .csv or .jsonl")
    try:
        lf = _scan(path, fmt)
        schema = lf.collect_schema()
        rows = int(lf.select(pl.len()).collect().item())
    except pl.exceptions.NoDataError:
        raise InputError(f"{path}: input is empty (no header, no rows)") from None
    except (pl.exceptions.PolarsError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: cannot read {fmt} input: {first}") from None
    if rows == 0:
        raise InputError(f"{path}: input has columns but no rows")
    if ROW_NUMBER in schema:
        raise InputError(f"{path}: column name {ROW_NUMBER!r} is reserved")
    return InputTable(path, fmt, tuple(schema.names()), {k: str(v) for k, v in schema.items()}, rows)


def check_id_column(table: InputTable, column: str) -> None:
    """Row keys name paid work when ``job.dedupe`` is off: every row needs its own, non-null id."""
    lf = _scan(table.path, table.format)
    try:
        counts = lf.select(nulls=pl.col(column).null_count(), repeated=pl.col(column).is_duplicated().sum()).collect()
        nulls, repeated = counts.row(0)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(f"{table.path}: cannot read id column {column!r}: {str(exc).splitlines()[0]}") from None
    if nulls:
        raise InputError(f"{table.path}: job.id_column {column!r} is empty on {nulls} row(s); every row needs an id")
    if repeated:
        example = lf.filter(pl.col(column).is_duplicated()).select(pl.col(column).first()).collect().item()
        raise InputError(
            f"{table.path}: job.id_column {column!r} repeats values (e.g. {example!r} on {repeated} rows); "
            "ids must be unique when job.dedupe = false"
        )


def selected_indices(total: int, selection: Selection) -> list[int] | None:
    """Original row numbers kept by a sample, sorted so output keeps input order; None keeps all."""
    if selection.sample is None:
        return None
    n = min(selection.sample, total)
    return sorted(random.Random(selection.sample_seed).sample(range(total), n))


def selected_rows(table: InputTable, selection: Selection) -> int:
    if selection.sample is not None:
        return min(selection.sample, table.rows)
    if selection.limit is not None:
        return min(selection.limit, table.rows)
    return table.rows


def read_frames(
    table: InputTable,
    selection: Selection,
    chunk_rows: int,
    columns: Sequence[str] | None = None,
) -> Iterator[pl.DataFrame]:
    """Chunks of the selected rows, each with ``ROW_NUMBER`` (the row's number in the whole input)."""
    if table.format == "parquet":
        yield from _parquet_frames(table, selection, chunk_rows, columns)
        return
    lf = _scan(table.path, table.format).with_row_index(ROW_NUMBER)
    if columns is not None:
        lf = lf.select([ROW_NUMBER, *columns])
    keep = selected_indices(table.rows, selection)
    if keep is not None:
        lf = lf.filter(pl.col(ROW_NUMBER).is_in(keep))
    elif selection.limit is not None:
        lf = lf.head(selection.limit)
    try:
        for frame in lf.collect_batches(chunk_size=chunk_rows, maintain_order=True):
            if frame.height:
                yield frame
    except pl.exceptions.PolarsError as exc:
        raise InputError(f"{table.path}: failed while reading: {str(exc).splitlines()[0]}") from None


def _parquet_frames(
    table: InputTable, selection: Selection, chunk_rows: int, columns: Sequence[str] | None
) -> Iterator[pl.DataFrame]:
    """Parquet through pyarrow's batch reader: memory stays at a row group plus one chunk.

    polars' ``collect_batches`` ran the whole scan ahead of a slow consumer: the 1M-row benchmark
    input sat in memory (~280 MB) while requests were built from its first chunks.
    """
    keep = selected_indices(table.rows, selection)
    limit = selection.limit if keep is None else None
    try:
        source = pq.ParquetFile(table.path)
        start = 0
        for batch in source.iter_batches(batch_size=chunk_rows, columns=list(columns) if columns is not None else None):
            if limit is not None and start >= limit:
                return
            frame = pl.from_arrow(batch)
            assert isinstance(frame, pl.DataFrame)
            frame = frame.with_row_index(ROW_NUMBER, offset=start)
            start += batch.num_rows
            if keep is not None:
                frame = frame.filter(pl.col(ROW_NUMBER).is_in(keep))
            elif limit is not None:
                frame = frame.filter(pl.col(ROW_NUMBER) < limit)
            if frame.height:
                yield frame
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{table.path}: failed while reading: {str(exc).splitlines()[0]}") from None


def read_rows(
    table: InputTable,
    selection: Selection,
    chunk_rows: int,
    columns: Sequence[str],
    id_column: str | None,
    row_range: RowRange | None = None,
) -> Iterator[list[Row]]:
    """Rows as plain Python values (only ``columns``), one list per chunk, for the hot loop.

    With ``row_range`` only those positions among the selected rows; frames before it are skipped
    before the costly conversion to dicts.
    """
    wanted = list(dict.fromkeys([*columns, *([id_column] if id_column else [])]))
    pos = 0
    for chunk in read_frames(table, selection, chunk_rows, wanted):
        frame = chunk
        if row_range is not None:
            lo, pos = pos, pos + chunk.height
            if pos <= row_range.start:
                continue
            if lo >= row_range.stop:
                return
            start = max(row_range.start, lo)
            frame = chunk.slice(start - lo, min(pos, row_range.stop) - start)
        numbers = frame.get_column(ROW_NUMBER).to_list()
        keys: list[Any] = frame.get_column(id_column).to_list() if id_column else numbers
        values = frame.select(wanted).to_dicts() if wanted else [{} for _ in numbers]
        yield [Row(index=n, key=str(k), values=v) for n, k, v in zip(numbers, keys, values, strict=True)]
