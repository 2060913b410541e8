"""CSV and TSV inputs: the check pass (header, row count, bad lines, every column's type, the id column,
the digest, in one open of the file) and the streamed read of the rows as typed frames.

pyarrow's streaming CSV reader parses a block at a time, every column as text; each frame is then cast to
the type inferred over the *whole* file by the check pass, so a float on row 900,000 of an int column
widens the column instead of failing mid-run. A bad line is one InputError naming its 1-based physical line
(the header is line 1): when pyarrow's own error cannot name it, a plain pass that follows quoting as pyarrow
does (``_csv_records``) finds it.
"""

from __future__ import annotations

from collections.abc import Collection, Generator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import polars as pl

from pipeline.errors import InputError
from pipeline.lazy import lazy
from pipeline.tables import input_bytes
from pipeline.tables.ids import IdScan
from pipeline.tables.input_bytes import (
    UTF8_CODECS,
    InputDigest,
    Replay,
    Undecodable,
    decode_message,
    first_line,
    text_codec,
    text_lines,
)
from pipeline.tables.input_table import InputTable

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv
else:  # pyarrow loads with the first CSV read, not when the package is imported (see lazy)
    pa, pc, pcsv = lazy("pyarrow"), lazy("pyarrow.compute"), lazy("pyarrow.csv")

#: Separators a one-column CSV header is checked for, with the word for them (see ``open_csv``).
_SEPARATORS = {"\t": "tab", ";": "semicolon", ",": "comma", "|": "vertical bar"}

#: Bytes pyarrow's CSV reader parses at a time; made 4 times larger (up to the cap) when one row is longer.
CSV_BLOCK = 1 << 20
CSV_BLOCK_CAP = 1 << 30
#: What polars' CSV type inference accepts (RE2 syntax); a column takes the narrowest type that every
#: non-empty value of the whole file matches: Int64, then Float64, else Boolean, else String.
_INT_RE = r"^-?\d+$"
_FLOAT_RE = r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-?(inf|NaN)$"
_BOOL_RE = r"(?i)^(true|false)$"
_CSV_TYPES: dict[str, pl.DataType] = {"Int64": pl.Int64(), "Float64": pl.Float64(), "Boolean": pl.Boolean()}


class DelimiterGuess(InputError):
    """A CSV file whose one-column header holds another separator: it was likely written with that one."""

    def __init__(self, message: str, delimiter: str) -> None:
        super().__init__(message)
        self.delimiter = delimiter


class _BlockTooSmall(Exception):
    """One row is longer than the read block: read again with a larger one."""


def open_csv(
    path: Path, codec: str, sep: str, *, sniff: bool, digest: InputDigest, id_column: str | None = None
) -> InputTable:
    """One streamed pass over the whole file: header, row count, bad lines, each column's type, the digest.

    The header is parsed from the first bytes read, which are then read again from memory by the pass
    over the rows (``Replay``): one open of the file.

    With ``sniff`` (no ``job.delimiter``), a header that reads as one column holding a tab, a semicolon, a
    comma or a bar is refused before any row is parsed: its rows would fail with a misleading field count,
    or every placeholder would miss, when the fix is one setting.
    """
    block = CSV_BLOCK
    while True:
        digest.reset()
        source = Replay(input_bytes.open_bytes(path, digest))
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
    return pcsv.ReadOptions(encoding="utf8" if codec in UTF8_CODECS else codec, block_size=block, use_threads=False)


def _csv_names(path: Path, raw: Replay, codec: str, block: int, sep: str) -> list[str]:
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
    source: Replay | None = None,
) -> Iterator[pa.RecordBatch]:
    """The file (or ``source``, the file opened already) as record batches of text columns, one block at a
    time; bad lines are InputErrors."""
    bad: list[pcsv.InvalidRow] = []

    def on_invalid(row: pcsv.InvalidRow) -> str:
        bad.append(row)
        return "error"

    raw = _Tracked(source if source is not None else input_bytes.open_bytes(path))
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


def csv_frames(table: InputTable, columns: Sequence[str] | None) -> Iterator[pl.DataFrame]:
    """The CSV as polars frames, one per read block, with the types ``open_input`` inferred."""
    schema = table.schema or {}
    codec = text_codec(table.path, table.encoding)
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
    return InputError(
        f"{path}: cannot read csv input: {first_line(exc)}; check that it is a CSV file with a header line"
    )


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
    follows quoting as pyarrow does, skipping blank lines as it does; ``Undecodable`` on bad bytes."""
    in_quote = False
    quote_line = start = 0
    fields = 1
    for line, text in text_lines(path, codec):
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
    except Undecodable as exc:
        return decode_message(path, codec, exc.line, exc.byte)
    return None


def csv_row_lines(table: InputTable, numbers: Collection[int]) -> dict[int, int]:
    """The line of a CSV file each of the rows ``numbers`` (0-based) starts on."""
    wanted, last = set(numbers), max(numbers)
    found: dict[int, int] = {}
    records = _csv_records(table.path, text_codec(table.path, table.encoding), table.delimiter)
    next(records, None)  # the header
    for row, (start, _, _, _) in enumerate(records):
        if row in wanted:
            found[row] = start
        if row >= last:
            break
    records.close()
    return found


class _Tracked:
    """A binary file as pyarrow reads it, counting the double quotes that go by.

    An odd count at the end means a quoted field may run to the end of the file, which pyarrow
    accepts silently as one long last value; that is when the slow, exact check runs.
    """

    def __init__(self, raw: BinaryIO | Replay) -> None:
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
