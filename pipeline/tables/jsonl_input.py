"""JSONL inputs: the check pass (row count, bad lines, every field's type over the whole file, the id
field, the digest) and the streamed read of the objects as typed frames.

Lines are parsed by orjson, ``JSONL_BATCH`` at a time, and turned into one polars frame per batch; the
check pass merges the batches' types into the file's (numbers widen to Float64, mixed scalars become
text), and the later reads cast each batch to them. A bad line is one InputError naming its 1-based
physical line.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from pipeline.errors import InputError
from pipeline.tables.ids import IdScan
from pipeline.tables.input_bytes import (
    UTF8_CODECS,
    InputDigest,
    Undecodable,
    byte_lines,
    decode_message,
    first_line,
    text_codec,
    text_lines,
)
from pipeline.tables.input_table import ROW_NUMBER, InputTable

#: JSONL lines turned into one frame at a time.
JSONL_BATCH = 4096


def open_jsonl(
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
    """One batch of a JSONL id field into ``ids``: as text (as ``jsonl_id_frames`` reads a text column), and
    as integers when every value is one."""
    text = pl.Series(ids.column, values, dtype=pl.String(), strict=False)
    whole = all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in values)
    ids.add(first_row, text, pl.Series(ids.column, values, dtype=pl.Int64(), strict=False) if whole else None)


class _Conflict(Exception):
    """Field ``name`` holds values of two kinds no one type holds (raised by ``_merge``)."""

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
    source = byte_lines(path, digest) if codec in UTF8_CODECS else iter(text_lines(path, codec, digest))
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
    except Undecodable as exc:
        raise InputError(decode_message(path, codec, exc.line, exc.byte)) from None
    if records:
        yield lines, records


_ORJSON_WHERE = re.compile(r":? line \d+ column (\d+) \(char \d+\)$")


def _json_message(path: Path, codec: str, line: int, text: bytes | str, exc: Exception) -> str:
    if isinstance(text, bytes):
        try:
            text.decode("utf-8")
        except UnicodeDecodeError as bad:
            return decode_message(path, codec, line, text[bad.start])
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
        raise InputError(
            f"{path}: line {lines[0]}: cannot use this object ({first_line(exc)}); "
            "give each field one type on every line"
        ) from None
    return frame


def _nulls(schema: dict[str, pl.DataType], n: int) -> pl.DataFrame:
    """``n`` rows of nulls typed as ``schema``: a batch of empty objects."""
    return pl.DataFrame([pl.Series(k, [None] * n, dtype=v) for k, v in schema.items()])


def jsonl_frames(table: InputTable, columns: Sequence[str] | None) -> Iterator[pl.DataFrame]:
    """The JSONL file as polars frames, one per ``JSONL_BATCH`` lines, with the types ``open_input`` found."""
    schema = table.schema or {}
    for lines, records in _jsonl_batches(table.path, text_codec(table.path, table.encoding), table.json_columns):
        frame = _jsonl_frame(table.path, lines, records, schema)
        yield frame.select(columns) if columns is not None else frame


def jsonl_id_frames(table: InputTable, column: str) -> Iterator[pl.DataFrame]:
    """The id field with ``ROW_NUMBER``, batch by batch, the lines parsed for that one field (with the type
    ``open_input`` found): building whole frames of every field cost 2.6 s per 1M rows."""
    dtype = (table.schema or {}).get(column, pl.String())
    start = 0
    for _, records in _jsonl_batches(table.path, text_codec(table.path, table.encoding), table.json_columns):
        ids = pl.Series(column, [r.get(column) for r in records], dtype=dtype, strict=False)
        yield pl.DataFrame([ids]).with_row_index(ROW_NUMBER, offset=start)
        start += len(records)


def jsonl_row_lines(table: InputTable, numbers: Collection[int]) -> dict[int, int]:
    """The line of a JSONL file each of the rows ``numbers`` (0-based) is on (blank lines are no rows)."""
    wanted, last = set(numbers), max(numbers)
    found: dict[int, int] = {}
    row = 0
    for lines, _ in _jsonl_batches(table.path, text_codec(table.path, table.encoding), table.json_columns):
        for line in lines:
            if row in wanted:
                found[row] = line
            row += 1
        if row > last:
            break
    return found
