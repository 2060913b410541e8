"""Parquet inputs: the check pass (digest, footer, the rows a run will read parsed, the id column) in one
open of the file, and the streamed read of row groups as frames of exactly a chunk.

A small input is read by polars alone, so a small job never imports pyarrow (``pipeline.lazy``); a larger
one streams through pyarrow's batch reader, a row group at a time, so memory stays at a row group plus
one chunk whatever the file size.
"""

from __future__ import annotations

import io
import os
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from pipeline.errors import InputError
from pipeline.lazy import lazy
from pipeline.records import Selection
from pipeline.tables.ids import IdScan
from pipeline.tables.input_bytes import InputDigest, first_line, hash_to_end
from pipeline.tables.input_table import ROW_NUMBER, InputTable, selected_indices

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq
else:  # a small Parquet input is read by polars alone; pyarrow loads for streamed reads (see lazy)
    pa, pq = lazy("pyarrow"), lazy("pyarrow.parquet")

#: A Parquet input up to this size is read into memory once, hashed and parsed from the same bytes (by
#: polars alone when it has few rows: no pyarrow import); a larger one is hashed, then streamed a row
#: group at a time by pyarrow from the same open file.
PARQUET_IN_MEMORY = 16 << 20
#: Rows of an in-memory Parquet input polars parses whole (no pyarrow import); more are streamed.
PARQUET_POLARS_ROWS = 65_536


def open_parquet(path: Path, digest: InputDigest, id_column: str | None, check_rows: int | None) -> InputTable:
    """One open of the file: its digest, its shape (footer), its first ``check_rows`` rows parsed (None:
    every row), and ``id_column``'s empty rows and hashes over every row."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size <= PARQUET_IN_MEMORY:
                data = f.read()
                digest.update(memoryview(data))
                digest.complete = True
                source: Any = io.BytesIO(data)
                schema = pl.read_parquet_schema(source)
            else:
                hash_to_end(f, digest)
                f.seek(0)
                source = pq.ParquetFile(f, pre_buffer=False)
                empty = pl.from_arrow(source.schema_arrow.empty_table())
                assert isinstance(empty, pl.DataFrame)
                schema = dict(empty.schema)
            names = tuple(schema)
            ids = IdScan(id_column) if id_column in names else None
            rows, parsed = _parse_parquet(path, source, ids, check_rows)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(f"{path}: cannot read parquet input: {first_line(exc)}") from None
    dtypes = {k: str(v) for k, v in schema.items()}
    return InputTable(path, "parquet", names, dtypes, rows, ids=ids, parsed_rows=parsed)


def _parse_parquet(path: Path, source: Any, ids: IdScan | None, check_rows: int | None) -> tuple[int, int]:
    """(rows, rows parsed): every column of the first ``check_rows`` rows, the id column of every row.
    ``source`` is the file's bytes (``io.BytesIO``) or a ``pq.ParquetFile``. Bytes of at most
    ``PARQUET_POLARS_ROWS`` rows are parsed whole by polars; more are streamed by pyarrow, a row group at a
    time, so memory stays bounded however well the file compressed."""
    try:
        if isinstance(source, io.BytesIO):
            source.seek(0)
            rows = int(pl.scan_parquet(source).select(pl.len()).collect().item())  # the footer's count
            if rows > PARQUET_POLARS_ROWS:
                source.seek(0)
                return _parse_parquet(path, pq.ParquetFile(source, pre_buffer=False), ids, check_rows)
            wanted = rows if check_rows is None else min(check_rows, rows)
            frame = pl.DataFrame()
            if wanted:
                source.seek(0)
                frame = pl.read_parquet(source, n_rows=wanted)
            if ids is not None:
                if frame.height < rows:
                    source.seek(0)
                    frame = pl.read_parquet(source, columns=[ids.column])
                ids.add_typed(0, frame.get_column(ids.column))
            return rows, wanted
        rows = int(source.metadata.num_rows)
        wanted = rows if check_rows is None else min(check_rows, rows)
        start = 0
        whole = list(source.schema_arrow.names)
        for group in range(source.metadata.num_row_groups):
            columns = whole if start < wanted else [ids.column] if ids is not None else None
            if columns is None:
                break
            for batch in source.iter_batches(batch_size=65_536, row_groups=[group], columns=columns):
                decoded = pl.from_arrow(batch)
                assert isinstance(decoded, pl.DataFrame)
                if ids is not None:
                    ids.add_typed(start, decoded.get_column(ids.column))
                start += batch.num_rows
        return rows, wanted
    except (pl.exceptions.PolarsError, pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: failed while reading: {first_line(exc)}") from None


def _parquet_batches(path: Path, batch_size: int, columns: Sequence[str] | None) -> Iterator[pa.Table]:
    """A Parquet file's rows in tables of exactly ``batch_size`` rows (the last may be shorter), read by
    one reader per few row groups.

    One ``iter_batches`` over a whole file grows the process as it goes (pyarrow 26: a 10M-row input read
    in 16,384-row batches took 124 MB to 343 MB); a reader per window of row groups stays bounded. A
    window's last batch is short, so batches are carried over to keep every chunk at ``batch_size`` rows:
    an incremental run compares the input with the output chunk by chunk, by position.

    ``pre_buffer=False``: with pyarrow's default, ``iter_batches`` caches every row group's compressed
    bytes it has read until the reader is dropped, so a pass over the input ended holding the whole file
    (16 bytes a row of the benchmark input: 160 MB at 10M rows, in ``plan``, ``run`` and the output pass).
    Without it, a pass holds one row group, and is no slower on a local file (inputs on object stores are
    read from a local copy).
    """
    with open(path, "rb") as f:  # opened here, as every input file, so audit hooks see it
        yield from _parquet_file_batches(pq.ParquetFile(f, pre_buffer=False), batch_size, columns)


def _parquet_file_batches(source: pq.ParquetFile, batch_size: int, columns: Sequence[str] | None) -> Iterator[pa.Table]:
    """``_parquet_batches`` of a file opened already: windows of row groups, batches carried over."""
    names = list(columns) if columns is not None else None
    meta = source.metadata
    held: list[pa.RecordBatch] = []
    rows = 0
    group = 0
    while group < meta.num_row_groups:
        window: list[int] = []
        size = 0
        while group < meta.num_row_groups and size < batch_size:
            window.append(group)
            size += meta.row_group(group).num_rows
            group += 1
        for batch in source.iter_batches(batch_size=batch_size, row_groups=window, columns=names):
            held.append(batch)
            rows += batch.num_rows
            if rows >= batch_size:
                whole = pa.Table.from_batches(held)
                while whole.num_rows >= batch_size:
                    yield whole.slice(0, batch_size)
                    whole = whole.slice(batch_size)
                held, rows = whole.to_batches(), whole.num_rows
    if rows:
        yield pa.Table.from_batches(held)


def parquet_frames(
    table: InputTable, selection: Selection, chunk_rows: int, columns: Sequence[str] | None
) -> Iterator[pl.DataFrame]:
    """The rows ``selection`` keeps, in chunks with ``ROW_NUMBER`` (``reader.read_frames`` for Parquet):
    memory stays at a row group plus one chunk.

    Not polars' ``collect_batches``: it ran the whole scan ahead of a slow consumer: the 1M-row benchmark
    input sat in memory (~280 MB) while requests were built from its first chunks.
    """
    keep = selected_indices(table.rows, selection)
    limit = selection.limit if keep is None else None
    try:
        for start, chunk in _parquet_chunks(table, chunk_rows, columns):
            if limit is not None and start >= limit:
                return
            frame = chunk.with_row_index(ROW_NUMBER, offset=start)
            if keep is not None:
                frame = frame.filter(pl.col(ROW_NUMBER).is_in(keep))
            elif limit is not None:
                frame = frame.filter(pl.col(ROW_NUMBER) < limit)
            if frame.height:
                yield frame
    except (pl.exceptions.PolarsError, pa.ArrowException, OSError) as exc:
        raise InputError(f"{table.path}: failed while reading: {str(exc).splitlines()[0]}") from None


def _parquet_chunks(
    table: InputTable, chunk_rows: int, columns: Sequence[str] | None
) -> Iterator[tuple[int, pl.DataFrame]]:
    """(first row number, frame) per chunk. An input of at most one chunk is read by polars alone, so a
    small job never imports pyarrow (``pipeline.lazy``); a larger one streams through pyarrow's batches."""
    names = list(columns) if columns is not None else None
    if table.rows <= chunk_rows:
        with open(table.path, "rb") as f:  # opened here, as every input file, so audit hooks see it
            whole = pl.read_parquet(f, columns=names)
        yield 0, whole
        return
    start = 0
    for batch in _parquet_batches(table.path, chunk_rows, columns):  # tables, chunk_rows rows each
        frame = pl.from_arrow(batch)
        assert isinstance(frame, pl.DataFrame)
        yield start, frame
        start += batch.num_rows


def parquet_rows(table: InputTable, numbers: Sequence[int], columns: Sequence[str]) -> Iterator[pl.DataFrame]:
    """The rows numbered ``numbers`` (sorted) of a Parquet input, reading only the row groups that hold
    them: an incremental run's few changed rows cost a row group each, not a read of the whole file."""
    try:
        f = open(table.path, "rb")  # noqa: SIM115 (held by the generator, closed below)
    except OSError as exc:
        raise InputError(f"{table.path}: failed while reading: {exc}") from None
    try:
        source = pq.ParquetFile(f, pre_buffer=False)
        start = 0
        for group in range(source.metadata.num_row_groups):
            size = source.metadata.row_group(group).num_rows
            here = numbers[bisect_left(numbers, start) : bisect_left(numbers, start + size)]
            if here:  # taken in Arrow: polars converts only the rows asked for, not the row group's
                picked = source.read_row_group(group, columns=list(columns)).take(pa.array([n - start for n in here]))
                frame = pl.from_arrow(picked)
                assert isinstance(frame, pl.DataFrame)
                frame = frame.with_row_index(ROW_NUMBER)
                yield frame.with_columns(pl.Series(ROW_NUMBER, here, dtype=frame.schema[ROW_NUMBER]))
            start += size
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{table.path}: failed while reading: {str(exc).splitlines()[0]}") from None
    finally:
        f.close()
