"""Input tables: one pass to check, then streamed chunks, as polars frames or plain rows for the hot loop.

A run opens its input three times: ``open_input``'s check pass, the pass that builds requests, and the
pass that writes the output. Rows are read again rather than held: a 10M-row input costs one chunk of
memory, not ten million dicts.

The check pass reads the whole file once: the xxh3-128 digest of its bytes (``uptodate``'s
fingerprint), the header, the row count, every column's type, any bad line, and the id column's hashes
(``check_ids``), so a bad line anywhere is found before anything is sent. A Parquet file's pass reads
its footer and parses the rows the run will read (a small file from memory with polars, a larger one
streamed by pyarrow from the same open file). The later passes run the same checks as they read.

Every format is streamed, so memory stays at one read block plus one chunk whatever the file size (a .gz
or .zst text file too: it is decompressed as it is read, see ``_open_bytes``): Parquet through
pyarrow's batch reader, CSV through pyarrow's streaming CSV reader (every column read as text, then cast
to the type inferred over the *whole* file by the check pass, so a float on row 900,000 of an int column
widens the column instead of failing mid-run), JSONL line by line with orjson. Every input file is
opened by Python (``open``), so an audit hook sees each pass.

A parse or decode error is one ``InputError`` line: ``<path>: line N: <what is wrong>; <what to do>``,
N being the 1-based physical line of the file (the CSV header is line 1).
"""

from __future__ import annotations

import codecs
import io
import os
import random
import re
from bisect import bisect_left
from collections.abc import Collection, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson
import polars as pl
import xxhash

from pipeline.errors import InputError
from pipeline.lazy import lazy
from pipeline.tables.ids import SHOWN_ROWS, IdScan

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq
else:  # a small Parquet input is read by polars alone; pyarrow loads for streamed reads (see lazy)
    pa, pc, pcsv, pq = lazy("pyarrow"), lazy("pyarrow.compute"), lazy("pyarrow.csv"), lazy("pyarrow.parquet")
from pipeline.records import Row, RowRange, Selection

__all__ = [
    "COMPRESSED",
    "FORMATS",
    "ROW_NUMBER",
    "InputTable",
    "RowRange",
    "Selection",
    "open_input",
    "read_frames",
    "read_rows",
]

ROW_NUMBER = "__seedbatch_row"
FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".jsonl": "ndjson",
    ".ndjson": "ndjson",
}
#: Compressed text inputs (``reviews.csv.gz``, ``events.jsonl.zst``) by their last suffix: read as they
#: stream, through pyarrow's decompressing input stream.
COMPRESSED = {".gz": "gzip", ".zst": "zstd"}
#: Separators a one-column CSV header is checked for, with the word for them (see ``_open_csv``).
_SEPARATORS = {"\t": "tab", ";": "semicolon", ",": "comma", "|": "vertical bar"}

#: Bytes pyarrow's CSV reader parses at a time; doubled (up to the cap) when one row is longer.
CSV_BLOCK = 1 << 20
CSV_BLOCK_CAP = 1 << 30
#: JSONL lines turned into one frame at a time.
JSONL_BATCH = 4096
_UTF8 = ("utf-8", "utf-8-sig")
#: What polars' CSV type inference accepts (RE2 syntax); a column takes the narrowest type that every
#: non-empty value of the whole file matches: Int64, then Float64, else Boolean, else String.
_INT_RE = r"^-?\d+$"
_FLOAT_RE = r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-?(inf|NaN)$"
_BOOL_RE = r"(?i)^(true|false)$"
_CSV_TYPES: dict[str, pl.DataType] = {"Int64": pl.Int64(), "Float64": pl.Float64(), "Boolean": pl.Boolean()}


@dataclass(frozen=True, slots=True)
class InputTable:
    """What the pipeline needs to know about an input before sending anything."""

    path: Path
    format: str
    columns: tuple[str, ...]
    dtypes: dict[str, str]
    rows: int
    #: The text encoding of a CSV/JSONL file (``job.encoding``); any name Python's codecs know.
    encoding: str = "utf-8"
    #: CSV/JSONL: every column's polars type, inferred over the whole file by ``open_input``.
    schema: dict[str, pl.DataType] | None = field(default=None, compare=False, repr=False)
    #: CSV: bytes parsed at a time, large enough for the file's longest row.
    block_size: int = CSV_BLOCK
    #: JSONL: fields kept as JSON text whatever they hold (a message list, a Batch line's body), so a field
    #: whose nesting differs from line to line (content as text here, as parts there) still reads.
    json_columns: tuple[str, ...] = ()
    #: CSV: the field separator (``job.delimiter``; a tab for .tsv, else a comma).
    delimiter: str = ","
    #: The file's (size, mtime_ns), taken before ``open_input`` opened it.
    stat: tuple[int, int] | None = field(default=None, compare=False)
    #: The id column's empty rows and hashes, when ``open_input`` was given it (``check_ids`` judges them).
    ids: IdScan | None = field(default=None, compare=False, repr=False)
    #: xxh3-128 of the file's bytes as stored (compressed or not), from ``open_input``'s pass over them
    #: (None: that pass did not reach the end). See ``uptodate``.
    digest: str | None = field(default=None, compare=False)
    #: The first rows ``open_input``'s pass parsed (CSV and JSONL: every row; Parquet: ``check_rows``).
    parsed_rows: int = field(default=0, compare=False)


class DelimiterGuess(InputError):
    """A CSV file whose one-column header holds another separator: it was likely written with that one."""

    def __init__(self, message: str, delimiter: str) -> None:
        super().__init__(message)
        self.delimiter = delimiter


def input_format(path: Path) -> tuple[str | None, str | None, str]:
    """(format, compression, the format's suffix) from a file name: ``x.tsv.gz`` → ("csv", "gzip", ".tsv")."""
    suffixes = [s.lower() for s in path.suffixes]
    if not suffixes:
        return None, None, ""
    compression = COMPRESSED.get(suffixes[-1])
    if compression is None:
        return FORMATS.get(suffixes[-1]), None, suffixes[-1]
    inner = suffixes[-2] if len(suffixes) > 1 else ""
    return FORMATS.get(inner), compression, inner


def open_input(
    path: Path,
    encoding: str = "utf-8",
    json_columns: Sequence[str] = (),
    delimiter: str | None = None,
    id_column: str | None = None,
    check_rows: int | None = None,
) -> InputTable:
    """Check the input exists, has a known format, parses, and has rows; return its shape.

    CSV and JSONL are read once, whole and streamed, to count rows, infer types and find any bad
    line before anything is sent; Parquet's shape comes from its footer. ``json_columns`` of a JSONL
    file are read as JSON text (see ``InputTable.json_columns``). ``delimiter`` is ``job.delimiter``: unset,
    a .tsv file is tab-separated and any other CSV comma-separated, and a header that reads as one column
    holding another separator is refused with the setting to use (``DelimiterGuess``). ``id_column``'s
    empty rows and hashes are gathered by the same pass (``InputTable.ids``, for ``check_ids``).
    ``check_rows``: a Parquet file's rows parsed by the pass (None: all; the rest are parsed when read),
    so a run of its first rows does not decode a large file whole.
    """
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
    codec = _codec(path, encoding)
    st = path.stat()
    digest = InputDigest()
    if fmt == "parquet":
        table = _open_parquet(path, digest, id_column, check_rows)
    elif path.stat().st_size == 0:
        raise InputError(f"{path}: input is empty ({'no header, no rows' if fmt == 'csv' else 'no lines'})")
    elif fmt == "csv":
        sep = delimiter if delimiter is not None else ("\t" if inner == ".tsv" else ",")
        table = _open_csv(path, codec, sep, sniff=delimiter is None, digest=digest, id_column=id_column)
    else:
        table = _open_jsonl(path, codec, tuple(json_columns), digest, id_column)
    if table.rows == 0 and fmt == "ndjson":
        raise InputError(f"{path}: input is empty (only blank lines)")
    if table.rows == 0:
        raise InputError(f"{path}: input has columns but no rows")
    if ROW_NUMBER in table.columns:
        raise InputError(f"{path}: column name {ROW_NUMBER!r} is reserved")
    return InputTable(
        path,
        fmt,
        table.columns,
        table.dtypes,
        table.rows,
        encoding,
        table.schema,
        table.block_size,
        table.json_columns,
        table.delimiter,
        (st.st_size, st.st_mtime_ns),
        table.ids,
        digest.hexdigest(),
        table.parsed_rows if fmt == "parquet" else table.rows,
    )


def _codec(path: Path, encoding: str) -> str:
    """The canonical codec name of ``encoding``, or an InputError naming the bad value."""
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        info = None
    if info is None or not getattr(info, "_is_text_encoding", True):
        raise InputError(
            f"{path}: unknown encoding {encoding!r} (job.encoding); "
            'use a text encoding Python knows, e.g. "utf-8", "latin-1" or "cp1252"'
        )
    return info.name


#: A Parquet input up to this size is read into memory once, hashed and parsed from the same bytes (by
#: polars alone when it has few rows: no pyarrow import); a larger one is hashed, then streamed a row
#: group at a time by pyarrow from the same open file.
PARQUET_IN_MEMORY = 16 << 20
#: Rows of an in-memory Parquet input polars parses whole (no pyarrow import); more are streamed.
PARQUET_POLARS_ROWS = 65_536


def _open_parquet(path: Path, digest: InputDigest, id_column: str | None, check_rows: int | None) -> InputTable:
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
                _hash_to_end(f, digest)
                f.seek(0)
                source = pq.ParquetFile(f, pre_buffer=False)
                empty = pl.from_arrow(source.schema_arrow.empty_table())
                assert isinstance(empty, pl.DataFrame)
                schema = dict(empty.schema)
            names = tuple(schema)
            ids = IdScan(id_column) if id_column in names else None
            rows, parsed = _parse_parquet(path, source, ids, check_rows)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(f"{path}: cannot read parquet input: {_first_line(exc)}") from None
    dtypes = {k: str(v) for k, v in schema.items()}
    return InputTable(path, "parquet", names, dtypes, rows, ids=ids, parsed_rows=parsed)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _hash_to_end(f: Any, digest: InputDigest) -> None:
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while n := f.readinto(buf):
        digest.update(view[:n])
    digest.complete = True


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
        raise InputError(f"{path}: failed while reading: {_first_line(exc)}") from None


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
    """The id column with ``ROW_NUMBER``, chunk by chunk. A JSONL file's lines are parsed for that one field
    (with the type ``open_input`` found): building whole frames of every field cost 2.6 s per 1M rows."""
    if table.format != "ndjson":
        yield from read_frames(table, Selection(), 65_536, [column])
        return
    dtype = (table.schema or {}).get(column, pl.String())
    start = 0
    for _, records in _jsonl_batches(table.path, _codec(table.path, table.encoding), table.json_columns):
        ids = pl.Series(column, [r.get(column) for r in records], dtype=dtype, strict=False)
        yield pl.DataFrame([ids]).with_row_index(ROW_NUMBER, offset=start)
        start += len(records)


def _where(table: InputTable, numbers: Sequence[int]) -> str:
    """``lines 2 and 5`` of a CSV or JSONL file, ``rows 1 and 4`` of a Parquet one (1-based)."""
    if table.format == "parquet":
        kind, shown = "row", [n + 1 for n in numbers]
    else:
        lines = _row_lines(table, numbers)
        kind, shown = "line", [lines[n] for n in numbers]
    words = [f"{n:,}" for n in shown]
    text = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"
    return f"{kind}{'s' if len(words) > 1 else ''} {text}"


def selected_indices(total: int, selection: Selection) -> list[int] | None:
    """Original row numbers kept by a sample, sorted so output keeps input order; None keeps all."""
    if selection.sample is None:
        return None
    n = min(selection.sample, total)
    return sorted(random.Random(selection.sample_seed).sample(range(total), n))


def selected_stop(table: InputTable, selection: Selection) -> int:
    """One past the last row number a selection keeps: the rows a pass over it reads."""
    keep = selected_indices(table.rows, selection)
    if keep is not None:
        return keep[-1] + 1 if keep else 0
    return min(selection.limit, table.rows) if selection.limit is not None else table.rows


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
    """Chunks of the selected rows, each with ``ROW_NUMBER`` (the row's number in the whole input).

    A bad line met while reading is an ``InputError`` naming it, as in ``open_input``.
    """
    if table.format == "parquet":
        yield from _parquet_frames(table, selection, chunk_rows, columns)
        return
    missing = [c for c in columns or () if c not in table.columns]
    if missing:
        raise InputError(f"{table.path}: no column {missing[0]!r} in the input")
    keep = selected_indices(table.rows, selection)
    limit = selection.limit if keep is None else None
    if keep is not None and not keep:
        return
    stop = keep[-1] + 1 if keep else limit  # rows past the last selected one are not read
    frames = _csv_frames(table, columns) if table.format == "csv" else _jsonl_frames(table, columns)
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


def _parquet_rows(table: InputTable, numbers: Sequence[int], columns: Sequence[str]) -> Iterator[pl.DataFrame]:
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
        frames = _parquet_rows(table, sorted(only), wanted)
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


# ----------------------------------------------------------------- bytes and text


def _open_bytes(path: Path, digest: InputDigest | None = None) -> BinaryIO:
    """The one place input files are opened for streaming (tests wrap it to watch what is read): a .gz or
    .zst file decompressed as it is read, so every reader and every line number sees the text. With
    ``digest``, the bytes as stored feed it as they are read (``open_input``'s pass)."""
    compression = input_format(path)[1]
    raw: io.RawIOBase = open(path, "rb", buffering=0)  # noqa: SIM115 (returned open: the caller closes it)
    if digest is not None:
        raw = _Digesting(raw, digest)
    if compression is None:
        return io.BufferedReader(raw)
    try:
        stream = pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), compression)
    except (pa.ArrowException, OSError) as exc:
        raw.close()
        raise InputError(f"{path}: cannot open the {compression} file: {str(exc).splitlines()[0]}") from None
    return io.BufferedReader(_Decompressed(stream, path, compression), buffer_size=1 << 16)


class InputDigest:
    """xxh3-128 of a file's bytes, fed by the pass that reads them; known once that pass reached the end."""

    def __init__(self) -> None:
        self._hash = xxhash.xxh3_128()
        self.complete = False

    def reset(self) -> None:
        """For a pass that starts over from the file's first byte."""
        self._hash.reset()
        self.complete = False

    def update(self, data: memoryview) -> None:
        self._hash.update(data)

    def hexdigest(self) -> str | None:
        return self._hash.hexdigest() if self.complete else None


class _Digesting(io.RawIOBase):
    """A file whose bytes feed an ``InputDigest`` as they are read."""

    def __init__(self, raw: io.RawIOBase, digest: InputDigest) -> None:
        self._raw = raw
        self._digest = digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer) or 0
        if n:
            self._digest.update(memoryview(buffer)[:n])
        else:
            self._digest.complete = True
        return n

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _Decompressed(io.RawIOBase):
    """pyarrow's decompressing stream as a Python binary file; a corrupt or cut-off file is an InputError."""

    def __init__(self, stream: pa.NativeFile, path: Path, compression: str) -> None:
        self._stream = stream
        self._path = path
        self._compression = compression

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._stream.read(len(buffer))
        except (pa.ArrowException, OSError) as exc:
            raise InputError(
                f"{self._path}: cannot decompress this {self._compression} file ({str(exc).splitlines()[0]}); "
                "check that it is complete"
            ) from None
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
        super().close()


class _Tracked:
    """A binary file as pyarrow reads it, counting the double quotes that go by.

    An odd count at the end means a quoted field may run to the end of the file, which pyarrow
    accepts silently as one long last value; that is when the slow, exact check runs.
    """

    def __init__(self, raw: BinaryIO | _Replay) -> None:
        self._raw = raw
        self.quotes = 0
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.quotes += data.count(b'"')
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True
        self._raw.close()


class _Replay:
    """A binary file whose first bytes read are kept, to be read again after ``rewind``: the CSV header is
    parsed from them, then the pass over the rows starts from the first byte without opening the file again.
    ``close`` before ``rewind`` keeps the file open (the header's reader closes its source)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._kept: bytearray | None = bytearray()
        self._replay = b""
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        if self._replay:
            take = len(self._replay) if size < 0 else size
            data, self._replay = self._replay[:take], self._replay[take:]
            if size < 0:
                data += self._raw.read()
            return data
        data = self._raw.read(size)
        if self._kept is not None:
            self._kept += data
        return data

    def rewind(self) -> None:
        if self._kept is not None:
            self._replay, self._kept = bytes(self._kept), None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if self._kept is None:
            self.closed = True
            self._raw.close()

    def release(self) -> None:
        """Close the file, whoever else holds it."""
        self._kept = None
        self.close()


class _Undecodable(Exception):
    def __init__(self, line: int, byte: int) -> None:
        super().__init__(line, byte)
        self.line = line
        self.byte = byte


def _decode_message(path: Path, codec: str, line: int, byte: int) -> str:
    if codec in _UTF8:
        return (
            f"{path}: line {line}: the file is not UTF-8 (byte 0x{byte:02x} at line {line}); "
            'set job.encoding, e.g. job.encoding = "latin-1"'
        )
    return (
        f"{path}: line {line}: the file is not {codec} (byte 0x{byte:02x} at line {line}); "
        'set job.encoding to the encoding it was saved in, e.g. job.encoding = "utf-8" or "cp1252"'
    )


def _text_lines(path: Path, codec: str, digest: InputDigest | None = None) -> Iterator[tuple[int, str]]:
    """Decoded physical lines (with their ``\\n``) and their 1-based numbers; ``_Undecodable`` on bad bytes."""
    decoder = codecs.getincrementaldecoder(codec)("strict")
    line = 1
    pending = ""
    with _open_bytes(path, digest) as f:
        for raw in f:
            try:
                pending += decoder.decode(raw)
            except UnicodeDecodeError as exc:
                raise _Undecodable(line + pending.count("\n"), exc.object[exc.start]) from None
            if "\n" in pending:
                *whole, pending = pending.split("\n")
                for text in whole:
                    yield line, text + "\n"
                    line += 1
        try:
            pending += decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise _Undecodable(line + pending.count("\n"), exc.object[exc.start]) from None
    if pending:
        yield line, pending


# ----------------------------------------------------------------- CSV


class _BlockTooSmall(Exception):
    """One row is longer than the read block: read again with a larger one."""


def _open_csv(
    path: Path, codec: str, sep: str, *, sniff: bool, digest: InputDigest, id_column: str | None = None
) -> InputTable:
    """One streamed pass over the whole file: header, row count, bad lines, each column's type, the digest.

    The header is parsed from the first bytes read, which are then read again from memory by the pass
    over the rows (``_Replay``): one open of the file.

    With ``sniff`` (no ``job.delimiter``), a header that reads as one column holding a tab, a semicolon, a
    comma or a bar is refused before any row is parsed: its rows would fail with a misleading field count,
    or every placeholder would miss, when the fix is one setting.
    """
    block = CSV_BLOCK
    while True:
        digest.reset()
        source = _Replay(_open_bytes(path, digest))
        try:
            names = _csv_names(path, source, codec, block, sep)
            if sniff and len(names) == 1:
                _check_separator(path, names[0], sep)
            seen: dict[str, set[str] | None] = dict.fromkeys(names)
            rows = 0
            ids = IdScan(id_column) if id_column in names else None
            source.rewind()
            for batch in _csv_batches(path, codec, block, names, None, sep, source):
                if ids is not None:
                    _scan_csv_ids(ids, rows, batch.column(id_column))
                rows += batch.num_rows
                for name, column in zip(names, batch.columns, strict=True):
                    seen[name] = _narrow(seen[name], column)
            break
        except _BlockTooSmall:
            if block >= CSV_BLOCK_CAP:
                raise InputError(
                    f"{path}: a row is longer than {CSV_BLOCK_CAP >> 20} MB; split the file or convert it to Parquet"
                ) from None
            block *= 4
        finally:
            source.release()
    schema: dict[str, pl.DataType] = {}
    for name, kinds in seen.items():
        kind = next((k for k in _CSV_TYPES if kinds and k in kinds), None)
        schema[name] = _CSV_TYPES[kind] if kind else pl.String()
    dtypes = {k: str(v) for k, v in schema.items()}
    return InputTable(path, "csv", tuple(names), dtypes, rows, codec, schema, block, delimiter=sep, ids=ids)


def _scan_csv_ids(ids: IdScan, first_row: int, column: pa.Array) -> None:
    """One batch of a CSV id column (text) into ``ids``, with its integers while every value is one."""
    text = pl.Series(ids.column, column)
    try:
        integers: pl.Series | None = pl.Series(ids.column, pc.cast(column, pa.int64()))
    except pa.ArrowInvalid:
        integers = None
    ids.add(first_row, text, integers)


def _check_separator(path: Path, header: str, sep: str) -> None:
    for other, word in _SEPARATORS.items():
        if other != sep and other in header:
            setting, current = ("\\t" if c == "\t" else c for c in (other, sep))
            raise DelimiterGuess(
                f"{path}: line 1: the header reads as one column {header!r}, and it holds {word}s: the file looks "
                f'{word}-separated; set job.delimiter = "{setting}" (or "{current}" if it is one column)',
                other,
            )


def _narrow(kinds: set[str] | None, column: pa.Array) -> set[str] | None:
    """The types every non-empty value seen so far in a column parses as (None: no value yet)."""
    if kinds is not None and not kinds:
        return kinds
    values = pc.drop_null(column)
    if len(values) == 0:
        return kinds
    kinds = set(_CSV_TYPES) if kinds is None else kinds
    for kind, pattern in (("Int64", _INT_RE), ("Float64", _FLOAT_RE), ("Boolean", _BOOL_RE)):
        if kind in kinds and not pc.all(pc.match_substring_regex(values, pattern)).as_py():
            kinds.discard(kind)
    if "Int64" in kinds:
        try:
            pc.cast(values, pa.int64())
        except pa.ArrowInvalid:  # more digits than an int64 holds: keep the text
            kinds.discard("Int64")
            kinds.discard("Float64")
    return kinds


def _csv_read_options(codec: str, block: int) -> pcsv.ReadOptions:
    # No reader threads: pyarrow's read-ahead thread calls back into Python for the file object, and a run
    # that stops early (an error, a --limit) left it running at exit: "terminate called", SIGABRT.
    return pcsv.ReadOptions(encoding="utf8" if codec in _UTF8 else codec, block_size=block, use_threads=False)


def _csv_names(path: Path, raw: _Replay, codec: str, block: int, sep: str) -> list[str]:
    """The header's column names (pyarrow parses the first block of ``raw`` to find them)."""
    try:
        reader = pcsv.open_csv(
            raw,
            read_options=_csv_read_options(codec, block),
            parse_options=pcsv.ParseOptions(
                delimiter=sep, newlines_in_values=True, invalid_row_handler=lambda _: "skip"
            ),
        )
        names = list(reader.schema.names)
        reader.close()
    except (pa.ArrowException, UnicodeError) as exc:
        if "Empty CSV file" in str(exc):
            raise InputError(f"{path}: input is empty (no header, no rows)") from None
        raise _csv_error(path, codec, sep, None, exc) from None
    for i, name in enumerate(names):
        if not name.strip():
            raise InputError(
                f"{path}: line 1: column {i + 1} of the header has no name"
                f"{f' (between {names[i - 1]!r} and {names[i + 1]!r})' if 0 < i < len(names) - 1 else ''}; "
                "give it one (an empty header name is not a column seedbatch can place or write)"
            )
        if name in names[:i]:
            raise InputError(f"{path}: line 1: column {name!r} appears twice in the header; rename one")
    return names


def _csv_batches(
    path: Path,
    codec: str,
    block: int,
    names: Sequence[str],
    columns: Sequence[str] | None,
    sep: str,
    source: _Replay | None = None,
) -> Iterator[pa.RecordBatch]:
    """The file (or ``source``, the file opened already) as record batches of text columns, one block at a
    time; bad lines are InputErrors."""
    bad: list[pcsv.InvalidRow] = []

    def on_invalid(row: pcsv.InvalidRow) -> str:
        bad.append(row)
        return "error"

    raw = _Tracked(source if source is not None else _open_bytes(path))
    reader: pcsv.CSVStreamingReader | None = None
    try:
        reader = pcsv.open_csv(
            raw,
            read_options=_csv_read_options(codec, block),
            parse_options=pcsv.ParseOptions(delimiter=sep, newlines_in_values=True, invalid_row_handler=on_invalid),
            convert_options=pcsv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()),
                include_columns=list(columns) if columns is not None else None,
                null_values=[""],
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,  # "" is an empty text, an empty field is null (as polars)
            ),
        )
        yield from reader
    except (pa.ArrowException, UnicodeError) as exc:
        raise _csv_error(path, codec, sep, bad[0] if bad else None, exc) from None
    finally:
        if reader is not None:
            reader.close()
        raw.close()
    if raw.quotes % 2:
        problem = _locate_csv_problem(path, codec, sep)
        if problem is not None:
            raise InputError(problem)


def _csv_frames(table: InputTable, columns: Sequence[str] | None) -> Iterator[pl.DataFrame]:
    """The CSV as polars frames, one per read block, with the types ``open_input`` inferred."""
    schema = table.schema or {}
    codec = _codec(table.path, table.encoding)
    for batch in _csv_batches(table.path, codec, table.block_size, table.columns, columns, table.delimiter):
        frame = pl.from_arrow(batch)
        assert isinstance(frame, pl.DataFrame)
        casts = []
        for name in frame.columns:
            dtype = schema.get(name, pl.String())
            if dtype == pl.Boolean:
                casts.append(pl.col(name).str.to_lowercase().eq("true").alias(name))
            elif dtype != pl.String:
                casts.append(pl.col(name).cast(dtype))
        yield frame.with_columns(casts) if casts else frame


def _csv_error(path: Path, codec: str, sep: str, row: pcsv.InvalidRow | None, exc: Exception) -> Exception:
    """The one-line InputError for a failed CSV read (or ``_BlockTooSmall`` when that is all it was)."""
    if isinstance(exc, InputError):  # a compressed file that does not decompress
        return exc
    if row is not None and row.number is not None and row.number > 0 and "\n" not in (row.text or "\n"):
        return InputError(_fields_message(path, row.number, row.number, row.expected_columns, row.actual_columns, sep))
    problem = _locate_csv_problem(path, codec, sep)
    if problem is not None:
        return InputError(problem)
    if "straddl" in str(exc):
        return _BlockTooSmall()
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return InputError(f"{path}: cannot read csv input: {first}; check that it is a CSV file with a header line")


def _fields_message(path: Path, start: int, end: int, expected: int, got: int, sep: str) -> str:
    word = _SEPARATORS.get(sep, repr(sep))
    if end > start:
        return (
            f"{path}: line {start}: a quoted field opened on this line runs to line {end}, making a row of {got} "
            f'fields instead of {expected}; close the quote (and write quotes inside a field as "")'
        )
    if got > expected:
        return (
            f"{path}: line {start}: {got} fields but the header has {expected}; "
            f"quote the field or remove the extra {word}"
        )
    return (
        f"{path}: line {start}: {got} fields but the header has {expected}; "
        f"add the missing fields (an empty one is just a {word}) or fix the header"
    )


def _csv_records(path: Path, codec: str, sep: str) -> Generator[tuple[int, int, int | None, int], None, None]:
    """Each record of a CSV file, header first: (first line, line its last quote opened on, last line or None
    when a quoted field is never closed, fields). A plain (slow, exact) pass that decodes line by line and
    follows quoting as pyarrow does, skipping blank lines as it does; ``_Undecodable`` on bad bytes."""
    in_quote = False
    quote_line = start = 0
    fields = 1
    for line, text in _text_lines(path, codec):
        if not in_quote:
            if not text.strip("\r\n"):
                continue  # blank lines are skipped, as pyarrow does
            start, fields = line, 1
        pos = 0
        while True:
            if in_quote:
                q = text.find('"', pos)
                if q < 0:
                    break
                if text.startswith('"', q + 1):
                    pos = q + 2
                    continue
                in_quote = False
                pos = q + 1
            elif text.startswith('"', pos):
                in_quote, quote_line, pos = True, line, pos + 1
                continue
            comma = text.find(sep, pos)
            if comma < 0:
                break
            fields, pos = fields + 1, comma + 1
        if not in_quote:
            yield start, quote_line, line, fields
    if in_quote:
        yield start, quote_line, None, fields


def _locate_csv_problem(path: Path, codec: str, sep: str) -> str | None:
    """The first bad line of a CSV file (``_csv_records``); None if it is fine.

    Run only after pyarrow failed or the quotes did not pair up: it can name the line a record or a
    quoted field starts on.
    """
    expected: int | None = None
    try:
        for start, quote_line, end, fields in _csv_records(path, codec, sep):
            if end is None:
                return (
                    f"{path}: line {quote_line}: a quoted field starts here and is never closed; "
                    'add the closing quote (and write quotes inside a field as "")'
                )
            if expected is None:
                expected = fields
            elif fields != expected:
                return _fields_message(path, quote_line if end > start else start, end, expected, fields, sep)
    except _Undecodable as exc:
        return _decode_message(path, codec, exc.line, exc.byte)
    return None


def _row_lines(table: InputTable, numbers: Collection[int]) -> dict[int, int]:
    """The line of a CSV or JSONL file each of the rows ``numbers`` (0-based) starts on."""
    wanted, last = set(numbers), max(numbers)
    found: dict[int, int] = {}
    row = 0
    if table.format == "csv":
        records = _csv_records(table.path, _codec(table.path, table.encoding), table.delimiter)
        next(records, None)  # the header
        for start, _, _, _ in records:
            if row in wanted:
                found[row] = start
            if row >= last:
                break
            row += 1
        records.close()
        return found
    for lines, _ in _jsonl_batches(table.path, _codec(table.path, table.encoding), table.json_columns):
        for line in lines:
            if row in wanted:
                found[row] = line
            row += 1
        if row > last:
            break
    return found


# ----------------------------------------------------------------- JSONL


def _open_jsonl(
    path: Path,
    codec: str,
    json_columns: tuple[str, ...] = (),
    digest: InputDigest | None = None,
    id_column: str | None = None,
) -> InputTable:
    """One pass over every line: row count, bad lines, the column types of the whole file, the digest."""
    schema: dict[str, pl.DataType] = {}
    rows = 0
    ids = IdScan(id_column) if id_column is not None else None
    for lines, records in _jsonl_batches(path, codec, json_columns, digest):
        if ids is not None:
            _scan_jsonl_ids(ids, rows, [r.get(ids.column) for r in records])
        rows += len(records)
        frame = _jsonl_frame(path, lines, records, None)
        _check_lossless(path, lines, records, frame)
        try:
            schema = _merge(schema, dict(frame.schema))
        except _Conflict as exc:
            for line, record in zip(lines, records, strict=True):
                if exc.name in record and record[exc.name] is not None:
                    one = _jsonl_frame(path, [line], [record], None)
                    try:
                        _merge(schema, {exc.name: one.schema[exc.name]})
                    except _Conflict:
                        raise InputError(_conflict_message(path, line, exc.name, record[exc.name])) from None
            raise InputError(_conflict_message(path, lines[0], exc.name, None)) from None
    dtypes = {k: str(v) for k, v in schema.items()}
    return InputTable(path, "ndjson", tuple(schema), dtypes, rows, codec, schema, json_columns=json_columns, ids=ids)


def _scan_jsonl_ids(ids: IdScan, first_row: int, values: list[Any]) -> None:
    """One batch of a JSONL id field into ``ids``: as text (as ``_id_frames`` reads a text column), and
    as integers when every value is one."""
    text = pl.Series(ids.column, values, dtype=pl.String(), strict=False)
    whole = all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in values)
    ids.add(first_row, text, pl.Series(ids.column, values, dtype=pl.Int64(), strict=False) if whole else None)


class _Conflict(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _merge(a: dict[str, pl.DataType], b: dict[str, pl.DataType]) -> dict[str, pl.DataType]:
    """Types that hold both: numbers widen to Float64, mixed scalars become String, a nested field must
    stay the same kind (object or array) on every line; columns in first-seen order."""
    out = dict(a)
    for name, dtype in b.items():
        have = out.get(name)
        if have is None or have == pl.Null:
            out[name] = dtype
        elif dtype in (have, pl.Null):
            continue
        elif have.is_numeric() and dtype.is_numeric():
            out[name] = pl.Float64() if have.is_float() or dtype.is_float() else pl.Int64()
        elif have.is_nested() or dtype.is_nested():
            if type(have) is not type(dtype):
                raise _Conflict(name)
            try:
                both = pl.concat(
                    [pl.DataFrame(schema={name: have}), pl.DataFrame(schema={name: dtype})], how="diagonal_relaxed"
                )
            except pl.exceptions.PolarsError:
                raise _Conflict(name) from None
            out[name] = both.schema[name]
        else:
            out[name] = pl.String()
    return out


def _check_lossless(path: Path, lines: list[int], records: list[dict[str, Any]], frame: pl.DataFrame) -> None:
    """polars turns a value that does not fit its column's inferred type into null: refuse that line."""
    for name in frame.columns:
        given = sum(1 for r in records if r.get(name) is not None)
        if given == frame.height - frame.get_column(name).null_count():
            continue
        kept = frame.get_column(name).is_not_null().to_list()
        for line, record, ok in zip(lines, records, kept, strict=True):
            if record.get(name) is not None and not ok:
                raise InputError(_conflict_message(path, line, name, record[name]))


def _conflict_message(path: Path, line: int, name: str, value: object) -> str:
    here = f"holds {_json_kind(value)} here, " if value is not None else ""
    return (
        f"{path}: line {line}: field {name!r} {here}unlike its type on other lines; "
        "give the field one type on every line (or quote it as text everywhere)"
    )


def _jsonl_batches(
    path: Path, codec: str, json_columns: tuple[str, ...] = (), digest: InputDigest | None = None
) -> Iterator[tuple[list[int], list[dict[str, Any]]]]:
    """Objects of a JSONL file, ``JSONL_BATCH`` lines at a time, with their line numbers."""
    lines: list[int] = []
    records: list[dict[str, Any]] = []
    source: Iterator[tuple[int, bytes | str]]
    source = _byte_lines(path, digest) if codec in _UTF8 else iter(_text_lines(path, codec, digest))
    try:
        for line, text in source:
            if not text.strip():
                continue
            try:
                record = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                raise InputError(_json_message(path, codec, line, text, exc)) from None
            if not isinstance(record, dict):
                raise InputError(
                    f"{path}: line {line}: not a JSON object ({_json_kind(record)}); "
                    "each line must be one {...} object: fix or remove that line"
                )
            for name in json_columns:
                value = record.get(name)
                if value is not None and not isinstance(value, str):
                    record[name] = orjson.dumps(value).decode()
            lines.append(line)
            records.append(record)
            if len(records) >= JSONL_BATCH:
                yield lines, records
                lines, records = [], []
    except _Undecodable as exc:
        raise InputError(_decode_message(path, codec, exc.line, exc.byte)) from None
    if records:
        yield lines, records


def _byte_lines(path: Path, digest: InputDigest | None = None) -> Iterator[tuple[int, bytes]]:
    with _open_bytes(path, digest) as f:
        for line, raw in enumerate(f, 1):
            yield line, raw[3:] if line == 1 and raw.startswith(codecs.BOM_UTF8) else raw


_ORJSON_WHERE = re.compile(r":? line \d+ column (\d+) \(char \d+\)$")


def _json_message(path: Path, codec: str, line: int, text: bytes | str, exc: Exception) -> str:
    if isinstance(text, bytes):
        try:
            text.decode("utf-8")
        except UnicodeDecodeError as bad:
            return _decode_message(path, codec, line, text[bad.start])
    what = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid JSON"
    what = _ORJSON_WHERE.sub(lambda m: f" at column {m.group(1)}", what)
    return f"{path}: line {line}: not valid JSON ({what}); fix or remove that line"


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, dict):
        return "an object"
    if value is None:
        return "null"
    return "a number"


def _jsonl_frame(
    path: Path, lines: list[int], records: list[dict[str, Any]], schema: dict[str, pl.DataType] | None
) -> pl.DataFrame:
    """One batch of objects as a frame; with ``schema``, cast to the types of the whole file."""
    try:
        frame = pl.DataFrame(records, infer_schema_length=None)
        if frame.height != len(records):  # every object empty
            frame = pl.DataFrame({"_": [None] * len(records)}).drop("_")
        if schema is not None:
            base = pl.DataFrame(schema=schema)
            frame = pl.concat([base, frame], how="diagonal_relaxed") if frame.width else _nulls(schema, len(records))
            if frame.schema != schema:
                frame = frame.cast(pl.Schema(schema))
    except (pl.exceptions.PolarsError, TypeError, ValueError, OverflowError) as exc:
        if len(records) > 1:
            for line, record in zip(lines, records, strict=True):
                _jsonl_frame(path, [line], [record], schema)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{path}: line {lines[0]}: cannot use this object ({first}); give each field one type on every line"
        ) from None
    return frame


def _nulls(schema: dict[str, pl.DataType], n: int) -> pl.DataFrame:
    return pl.DataFrame([pl.Series(k, [None] * n, dtype=v) for k, v in schema.items()])


def _jsonl_frames(table: InputTable, columns: Sequence[str] | None) -> Iterator[pl.DataFrame]:
    schema = table.schema or {}
    for lines, records in _jsonl_batches(table.path, _codec(table.path, table.encoding), table.json_columns):
        frame = _jsonl_frame(table.path, lines, records, schema)
        yield frame.select(columns) if columns is not None else frame
