"""Input tables: one pass to check, then streamed chunks, as polars frames or plain rows for the hot loop.

A run opens its input three times: ``open_input``'s check pass, the pass that builds requests, and the
pass that writes the output. Rows are read again rather than held: a 10M-row input costs one chunk of
memory, not ten million dicts.

The check pass reads the whole file once: the xxh3-128 digest of its bytes (``uptodate``'s
fingerprint), the header, the row count, every column's type, any bad line, and the id column's hashes
(``check_ids``), so a bad line anywhere is found before anything is sent. A Parquet file's pass reads
its footer and parses the rows the run will read. The later passes run the same checks as they read.

Every format is streamed, so memory stays at one read block plus one chunk whatever the file size. This
module holds what is common to them (the checks, the selection of rows, the row numbers, rows as plain
values); each format is read by its own module: ``delimited`` (CSV, TSV), ``jsonl_input``,
``parquet_input``, over ``input_bytes`` (the one opener, the digest, decompression, lines).

A parse or decode error is one ``InputError`` line: ``<path>: line N: <what is wrong>; <what to do>``,
N being the 1-based physical line of the file (the CSV header is line 1).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Collection, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.errors import InputError
from pipeline.records import Row, RowRange, Selection
from pipeline.tables.delimited import DelimiterGuess, csv_frames, csv_row_lines, open_csv
from pipeline.tables.ids import SHOWN_ROWS, IdScan
from pipeline.tables.input_bytes import COMPRESSED, InputDigest, input_format, text_codec
from pipeline.tables.input_table import (
    ROW_NUMBER,
    InputTable,
    selected_indices,
    selected_rows,
    selected_stop,
)
from pipeline.tables.jsonl_input import jsonl_frames, jsonl_id_frames, jsonl_row_lines, open_jsonl
from pipeline.tables.parquet_input import open_parquet, parquet_frames, parquet_rows

__all__ = [
    "COMPRESSED",
    "ROW_NUMBER",
    "DelimiterGuess",
    "InputTable",
    "check_ids",
    "open_input",
    "read_frames",
    "read_rows",
    "selected_indices",
    "selected_rows",
    "selected_stop",
]


def open_input(
    path: Path,
    encoding: str = "utf-8",
    json_columns: Sequence[str] = (),
    delimiter: str | None = None,
    id_column: str | None = None,
    check_rows: int | None = None,
) -> InputTable:
    """Check the input exists, has a known format, parses, and has rows; return its shape.

    The file is opened once: CSV and JSONL are read whole and streamed, to digest the bytes, count rows,
    infer types and find any bad line before anything is sent; a Parquet file is digested, its shape taken
    from its footer and its rows parsed (see ``check_rows``). ``json_columns`` of a JSONL file are read as
    JSON text (see ``InputTable.json_columns``). ``delimiter`` is ``job.delimiter``: unset, a .tsv file is
    tab-separated and any other CSV comma-separated, and a header that reads as one column holding another
    separator is refused with the setting to use (``DelimiterGuess``). ``id_column``'s empty rows and
    hashes are gathered by the same pass (``InputTable.ids``, for ``check_ids``). ``check_rows``: a Parquet
    file's rows parsed by the pass (None: all; the rest are parsed when read), so a run of its first rows
    does not decode a large file whole.
    """
    fmt, inner = _readable_format(path, delimiter)
    codec = text_codec(path, encoding)
    st = path.stat()
    digest = InputDigest()
    if fmt == "parquet":
        table = open_parquet(path, digest, id_column, check_rows)
    elif st.st_size == 0:
        raise InputError(f"{path}: input is empty ({'no header, no rows' if fmt == 'csv' else 'no lines'})")
    elif fmt == "csv":
        sep = delimiter if delimiter is not None else ("\t" if inner == ".tsv" else ",")
        table = open_csv(path, codec, sep, sniff=delimiter is None, digest=digest, id_column=id_column)
    else:
        table = open_jsonl(path, codec, tuple(json_columns), digest, id_column)
    if table.rows == 0 and fmt == "ndjson":
        raise InputError(f"{path}: input is empty (only blank lines)")
    if table.rows == 0:
        raise InputError(f"{path}: input has columns but no rows")
    if ROW_NUMBER in table.columns:
        raise InputError(f"{path}: column name {ROW_NUMBER!r} is reserved")
    return replace(
        table,
        encoding=encoding,
        stat=(st.st_size, st.st_mtime_ns),
        digest=digest.hexdigest(),
        parsed_rows=table.parsed_rows if fmt == "parquet" else table.rows,
    )


def _readable_format(path: Path, delimiter: str | None) -> tuple[str, str]:
    """(format, the format's suffix) of an input file that exists and can be read with these settings."""
    if not path.exists():
        raise InputError(f"{path}: input file not found (set job.input or pass --input)")
    if path.is_dir():
        raise InputError(f"{path}: input is a directory; give one .parquet, .csv, .tsv or .jsonl file")
    fmt, compression, inner = input_format(path)
    if fmt is None:
        shown = "".join(path.suffixes[-2:]) if compression else path.suffix
        raise InputError(
            f"{path}: unknown input format {shown!r}; use .parquet, .csv, .tsv or .jsonl "
            "(the text ones may be compressed: .gz, .zst)"
        )
    if fmt == "parquet" and compression:
        raise InputError(f"{path}: a compressed Parquet file; decompress it (Parquet compresses its own columns)")
    if delimiter is not None and fmt != "csv":
        kind = "JSONL" if fmt == "ndjson" else "Parquet"
        raise InputError(f"{path}: job.delimiter is for CSV and TSV input; remove it for a {kind} file")
    return fmt, inner


#: Repeated id hashes whose rows are read again to compare their values, and rows read per hash, at most.
SUSPECT_HASHES = 64
ROWS_PER_HASH = 16


def check_ids(table: InputTable, column: str, why: str = " (each id names one row of the output)") -> None:
    """Every row has an id of its own: ids are how answers are joined back to rows, so a repeated or empty
    one stops the run before anything is sent, naming the first rows (lines) and values.

    A 64-bit hash per row is kept (16 bytes a row with its sorted copy, not the ids), taken by
    ``open_input``'s pass when it was given the column (``ids``), else by a pass over the id column; rows
    whose hashes repeat are read again to compare their values, so a hash collision is never an error.
    """
    scan = table.ids if table.ids is not None and table.ids.column == column else None
    hashes = scan.hashes((table.schema or {}).get(column)) if scan is not None else None
    if scan is None or hashes is None:
        scan = IdScan(column)
        for frame in _id_frames(table, column):
            scan.add_typed(int(frame.get_column(ROW_NUMBER)[0]), frame.get_column(column))
        hashes = scan.hashes(None)
    if scan.n_empty:
        where = _where(table, scan.empty)
        more = f" ({scan.n_empty:,} rows)" if scan.n_empty > len(scan.empty) else ""
        raise InputError(
            f"{table.path}: job.id_column {column!r} is empty on {where}{more}; every row needs an id{why}"
        )
    if not hashes:
        return
    # Sorted, a repeated hash sits beside its twin: 16 bytes a row, where ``is_duplicated``'s hash table of
    # groups took ~180 MB at 1M rows.
    both = pl.concat(hashes)
    del hashes
    ordered = both.sort()
    twins = ordered.slice(1) == ordered.slice(0, len(ordered) - 1)
    if not twins.any():
        return
    repeated_hashes = ordered.slice(1).filter(twins).unique()
    del ordered, twins
    # A few repeated hashes, the earliest in row order, and a few rows of each are read again: an input whose
    # every id repeats must not build a set of every row. A value on two of them is the error.
    first_rows = both.is_in(repeated_hashes.implode()).arg_true().head(SUSPECT_HASHES)
    chosen = both.gather(first_rows).unique(maintain_order=True)
    mask = both.is_in(chosen.implode())
    rows_of = pl.DataFrame({"h": both.filter(mask), "row": mask.arg_true().cast(pl.Int64)})
    wanted = rows_of.group_by("h", maintain_order=True).head(ROWS_PER_HASH).get_column("row").sort()
    seen: dict[str, list[int]] = {}
    for frame in _id_frames(table, column):
        picked = frame.filter(pl.col(ROW_NUMBER).cast(pl.Int64).is_in(wanted))
        for number, value in zip(
            picked.get_column(ROW_NUMBER).to_list(), picked.get_column(column).to_list(), strict=True
        ):
            seen.setdefault(str(value), []).append(number)
        if int(frame.get_column(ROW_NUMBER)[-1]) >= int(wanted[-1]):
            break
    repeated = {value: numbers for value, numbers in seen.items() if len(numbers) > 1}
    if not repeated:
        return  # only hashes collided
    value, numbers = min(repeated.items(), key=lambda item: item[1][1])  # the first row that repeats an id
    same_hash = int((both == both[numbers[0]]).sum())
    count = len(numbers) if same_hash <= ROWS_PER_HASH else same_hash  # (a collision aside)
    notes = [f"{count:,} rows"] if count > SHOWN_ROWS else []
    if len(repeated_hashes) > 1:
        notes.append(f"{len(repeated_hashes) - 1:,} other id(s) repeat too")
    note = f" ({'; '.join(notes)})" if notes else ""
    raise InputError(
        f"{table.path}: job.id_column {column!r} repeats {value!r} on {_where(table, numbers[:SHOWN_ROWS])}"
        f"{note}; ids must be unique{why}"
    )


def _id_frames(table: InputTable, column: str) -> Iterator[pl.DataFrame]:
    """The id column with ``ROW_NUMBER``, chunk by chunk (a JSONL file's lines parsed for that one field)."""
    if table.format == "ndjson":
        yield from jsonl_id_frames(table, column)
    else:
        yield from read_frames(table, Selection(), 65_536, [column])


def _where(table: InputTable, numbers: Sequence[int]) -> str:
    """``lines 2 and 5`` of a CSV or JSONL file, ``rows 1 and 4`` of a Parquet one (1-based)."""
    if table.format == "parquet":
        kind, shown = "row", [n + 1 for n in numbers]
    else:
        lines = csv_row_lines(table, numbers) if table.format == "csv" else jsonl_row_lines(table, numbers)
        kind, shown = "line", [lines[n] for n in numbers]
    words = [f"{n:,}" for n in shown]
    text = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"
    return f"{kind}{'s' if len(words) > 1 else ''} {text}"


def read_frames(
    table: InputTable,
    selection: Selection,
    chunk_rows: int,
    columns: Sequence[str] | None = None,
) -> Iterator[pl.DataFrame]:
    """Chunks of the selected rows, each with ``ROW_NUMBER`` (the row's number in the whole input).

    A bad line met while reading is an ``InputError`` naming it, as in ``open_input``.
    """
    if table.format == "parquet":
        yield from parquet_frames(table, selection, chunk_rows, columns)
        return
    missing = [c for c in columns or () if c not in table.columns]
    if missing:
        raise InputError(f"{table.path}: no column {missing[0]!r} in the input")
    keep = selected_indices(table.rows, selection)
    limit = selection.limit if keep is None else None
    if keep is not None and not keep:
        return
    stop = keep[-1] + 1 if keep else limit  # rows past the last selected one are not read
    frames = csv_frames(table, columns) if table.format == "csv" else jsonl_frames(table, columns)
    start = 0
    for chunk in _rechunk(frames, chunk_rows):
        if stop is not None and start >= stop:
            return
        frame = chunk.with_row_index(ROW_NUMBER, offset=start)
        lo, start = start, start + chunk.height
        if keep is not None:
            here = keep[bisect_left(keep, lo) : bisect_left(keep, start)]
            frame = frame.filter(pl.col(ROW_NUMBER).is_in(here)) if len(here) < chunk.height else frame
        elif limit is not None and start > limit:
            frame = frame.head(limit - lo)
        if frame.height:
            yield frame


def _rechunk(frames: Iterator[pl.DataFrame], chunk_rows: int) -> Iterator[pl.DataFrame]:
    """Frames of exactly ``chunk_rows`` rows (the last may be shorter) from frames of any height."""
    buf: list[pl.DataFrame] = []
    held = 0
    for frame in frames:
        buf.append(frame)
        held += frame.height
        while held >= chunk_rows:
            whole = pl.concat(buf) if len(buf) > 1 else buf[0]
            yield whole.slice(0, chunk_rows)
            buf = [whole.slice(chunk_rows)]
            held -= chunk_rows
    if held:
        yield pl.concat(buf) if len(buf) > 1 else buf[0]


def read_rows(
    table: InputTable,
    selection: Selection,
    chunk_rows: int,
    columns: Sequence[str],
    id_column: str | None,
    row_range: RowRange | None = None,
    only: Collection[int] | None = None,
) -> Iterator[list[Row]]:
    """Rows as plain Python values (only ``columns``), one list per chunk, for the hot loop.

    With ``row_range`` only those positions among the selected rows; frames before it are skipped
    before the costly conversion to dicts. With ``only``, only rows with those row numbers (an
    incremental run's changed rows), filtered before the conversion too.
    """
    wanted_rows = pl.Series(sorted(only), dtype=pl.Int64) if only is not None else None
    wanted = list(dict.fromkeys([*columns, *([id_column] if id_column else [])]))
    pos = 0
    frames = read_frames(table, selection, chunk_rows, wanted)
    if only is not None and table.format == "parquet" and selection.sample is None and row_range is None:
        frames = parquet_rows(table, sorted(only), wanted)
    for chunk in frames:
        frame = chunk
        if row_range is not None:
            lo, pos = pos, pos + chunk.height
            if pos <= row_range.start:
                continue
            if lo >= row_range.stop:
                return
            start = max(row_range.start, lo)
            frame = chunk.slice(start - lo, min(pos, row_range.stop) - start)
        if wanted_rows is not None:
            frame = frame.filter(pl.col(ROW_NUMBER).cast(pl.Int64).is_in(wanted_rows))
            if not frame.height:
                continue
        numbers = frame.get_column(ROW_NUMBER).to_list()
        keys: list[Any] = frame.get_column(id_column).to_list() if id_column else numbers
        values = frame.select(wanted).to_dicts() if wanted else [{} for _ in numbers]
        yield [Row(index=n, key=str(k), values=v) for n, k, v in zip(numbers, keys, values, strict=True)]
