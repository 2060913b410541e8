"""Patching an output rather than rebuilding it: find the input rows that changed since the output was
written and the rows sharing their requests, then rewrite only those rows, copying every other row as it is.

``uptodate.patchable`` says whether a run may patch, ``incremental.changed_rows`` which rows, with the two
readers here (``changed_positions``, ``sharing_rows``); ``patch_output`` rewrites the output. Only Parquet
outputs are patched: they are read back typed, a window of row groups at a time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from pipeline.lazy import lazy
from pipeline.tables.writer import OUTPUT_COLUMNS, AnswerLookup, TypedColumns, answered_rows, atomic_path

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
else:  # only a rerun patches (see lazy)
    pa, pc, pq = lazy("pyarrow"), lazy("pyarrow.compute"), lazy("pyarrow.parquet")


def _parquet(source: Path | pq.ParquetFile) -> pq.ParquetFile:
    """An open Parquet file. Opening parses the footer, which grows with the row groups and costs several
    times its size to hold, so each patch step opens the output once."""
    return source if isinstance(source, pq.ParquetFile) else pq.ParquetFile(source, pre_buffer=False)


def _batches(
    path: Path | pq.ParquetFile, batch_size: int, columns: Sequence[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """A Parquet file's rows in record batches, one reader per few row groups (about ``batch_size`` rows).

    One ``iter_batches`` over a whole file keeps growing the process as it reads; a reader per window of
    row groups stays bounded, and a patch reads both the input and the output that way.
    """
    source = _parquet(path)
    names = list(columns) if columns is not None else None
    meta = source.metadata
    window: list[int] = []
    held = 0
    for group in range(meta.num_row_groups):
        window.append(group)
        held += meta.row_group(group).num_rows
        if held >= batch_size or group == meta.num_row_groups - 1:
            # One thread: each reading thread keeps an allocator cache of its own, memory a patch does not need.
            yield from source.iter_batches(batch_size=batch_size, row_groups=window, columns=names, use_threads=False)
            window, held = [], 0


def _positioned(
    path: Path | pq.ParquetFile, chunk_rows: int, columns: Sequence[str] | None = None
) -> Iterator[pl.DataFrame]:
    """An output's rows in frames of exactly ``chunk_rows`` (the last may be shorter)."""
    buf: list[pl.DataFrame] = []
    held = 0
    names = list(columns) if columns is not None else None
    for batch in _batches(path, chunk_rows, names):
        frame = pl.from_arrow(batch)
        assert isinstance(frame, pl.DataFrame)
        buf.append(frame)
        held += frame.height
        while held >= chunk_rows:
            whole = pl.concat(buf) if len(buf) > 1 else buf[0]
            yield whole.slice(0, chunk_rows)
            buf, held = [whole.slice(chunk_rows)], held - chunk_rows
    if held:
        yield pl.concat(buf) if len(buf) > 1 else buf[0]


def _positioned_tables(path: Path | pq.ParquetFile, chunk_rows: int) -> Iterator[pa.Table]:
    """``_positioned`` as Arrow tables: a chunk copied as it is never becomes a polars frame."""
    buf: list[pa.RecordBatch] = []
    held = 0
    for batch in _batches(path, chunk_rows):
        buf.append(batch)
        held += batch.num_rows
        while held >= chunk_rows:
            whole = pa.Table.from_batches(buf)
            yield whole.slice(0, chunk_rows)
            buf, held = whole.slice(chunk_rows).to_batches(), held - chunk_rows
    if held:
        yield pa.Table.from_batches(buf)


def changed_positions(
    path: Path, frames: Iterable[pl.DataFrame], row_number_column: str, chunk_rows: int, limit: int
) -> list[int] | None:
    """Row numbers of ``frames`` (the selected input rows, ``chunk_rows`` each, numbered from 0) whose
    values differ from the copy of the input in the output at ``path``; rows past its end count as changed.

    None when the output cannot be compared row by row (other columns or types, fewer input rows than
    it holds, nested values) or more than ``limit`` rows changed: then the whole output is rewritten.
    """
    try:
        output = pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowException, OSError):
        return None
    if not set(OUTPUT_COLUMNS) <= set(output.schema_arrow.names):
        return None  # written before an answer column was added: rewritten whole, with it
    output_rows = output.metadata.num_rows
    changed: list[int] = []
    seen = 0
    old_frames: Iterator[pl.DataFrame] | None = None
    for frame in frames:
        new = frame.drop(row_number_column)
        numbers = frame.get_column(row_number_column)
        if old_frames is None:
            if new.columns != output.schema_arrow.names[: new.width]:
                return None
            old_frames = _positioned(output, chunk_rows, new.columns)
        seen += frame.height
        old = next(old_frames, None)
        if old is None:
            changed.extend(numbers.to_list())
        else:
            if old.schema != new.schema:
                return None
            same = pl.Series([True] * old.height)
            try:
                for name in new.columns:
                    same = same & new.get_column(name).head(old.height).eq_missing(old.get_column(name))
            except (pl.exceptions.PolarsError, TypeError):
                return None
            changed.extend(numbers.head(old.height).filter(~same).to_list())
            changed.extend(numbers.slice(old.height).to_list())
        if len(changed) > limit:
            return None
    if seen < output_rows:
        return None  # rows were removed: every later row moved
    return changed


def sharing_rows(path: Path, positions: set[int], hashes: set[str], limit: int) -> list[int] | None:
    """Positions of the output's rows whose request is one of ``hashes`` or one the rows at ``positions``
    asked; None once they are more than ``limit``. Two reads of the ``request_hash`` column, one open."""
    output = pq.ParquetFile(path, pre_buffer=False)
    asked = set(hashes)
    ordered = sorted(positions)
    start = 0
    for batch in _batches(output, 262_144, ["request_hash"]):
        end = start + batch.num_rows
        here = [p - start for p in ordered[bisect_left(ordered, start) : bisect_left(ordered, end)]]
        if here:
            asked.update(h for h in batch.column(0).take(pa.array(here)).to_pylist() if h is not None)
        start += batch.num_rows
    found: list[int] = []
    if not asked:
        return found
    wanted = pa.array(sorted(asked), type=pa.string())
    start = 0
    for batch in _batches(output, 262_144, ["request_hash"]):
        column = batch.column(0).cast(pa.string())
        hits = pc.indices_nonzero(pc.fill_null(pc.is_in(column, value_set=wanted), False)).to_pylist()
        found.extend(start + i for i in hits)
        if len(found) > limit:
            return None
        start += batch.num_rows
    return found


def patch_output(
    path: Path,
    frames: Iterable[pl.DataFrame],
    row_number_column: str,
    answers_for: AnswerLookup,
    changed: set[int],
    chunk_rows: int,
    *,
    typed: TypedColumns | None = None,
    kept: dict[str, int] | None = None,
) -> dict[str, int]:
    """Rewrite the output at ``path`` with only the ``changed`` rows (row numbers = positions) rebuilt from
    their input and answers; every other row is copied from the old file as it is. Returns rows by status;
    ``kept``, when given, receives the copied rows by status (the run reused their answers).

    Exact when ``changed`` holds every row asking any request one of its rows asks or asked (the caller,
    ``incremental.changed_rows``, makes it so): which row of a request's askers carries its usage then
    depends on rows in ``changed`` only, and the run's row map holds all of them.
    """
    old = pq.ParquetFile(
        path, pre_buffer=False
    )  # opened once (its footer can be large); replaced under it only at the end
    schema = old.schema_arrow
    old_tables = _positioned_tables(old, chunk_rows)
    counts: dict[str, int] = {}
    redo = pl.Series(sorted(changed), dtype=pl.Int64)
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for frame in frames:
            old_table = next(old_tables, None)
            numbers = frame.get_column(row_number_column)
            mask = numbers.cast(pl.Int64).is_in(redo.implode())
            old_height = old_table.num_rows if old_table is not None else 0
            if old_table is not None and old_height == frame.height and not mask.any():
                table = old_table
                if kept is not None:
                    _count_statuses(kept, table.column("status"))
            else:
                pieces: list[pa.Table] = []
                positions: list[pl.Series] = []
                if old_table is not None:  # rows past the old output's end are all changed (new rows)
                    keep = ~mask.head(old_height)
                    pieces.append(old_table.filter(keep.to_arrow()).cast(schema))
                    positions.append(numbers.head(old_height).filter(keep))
                    if kept is not None:
                        _count_statuses(kept, pieces[-1].column("status"))
                if mask.any():
                    fresh = answered_rows(frame.filter(mask), row_number_column, answers_for, typed)
                    pieces.append(fresh.to_arrow().cast(schema))
                    positions.append(numbers.filter(mask))
                table = pa.concat_tables(pieces).take(pl.concat(positions).arg_sort().to_arrow())
                if table.num_rows != frame.height:
                    raise RuntimeError(f"{path}: patched chunk has {table.num_rows} rows, expected {frame.height}")
            _count_statuses(counts, table.column("status"))
            writer.write_table(table.cast(schema) if table.schema != schema else table)
    return counts


def _count_statuses(counts: dict[str, int], statuses: pa.ChunkedArray) -> None:
    for item in pc.value_counts(statuses).to_pylist():
        counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
