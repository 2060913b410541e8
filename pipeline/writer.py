"""Input rows + ledger answers → one output file (Parquet, CSV or JSONL), written atomically, chunk by chunk.

The output is rebuilt from the input and the ledger at the end of every run, so it always matches
the ledger; a crash mid-write leaves the previous output untouched (temp file, then ``os.replace``).
The format follows the file's extension (``spec.OUTPUT_FORMATS``): Parquet keeps every type; CSV has
no nested values, so list and struct columns are written there as JSON text (``json.loads`` gives the
value back); JSONL keeps nesting. Binary cells (images read from a Parquet input) are base64 text in
CSV and JSONL, which have no bytes.
"""

from __future__ import annotations

import contextlib
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from pipeline.errors import InputError, PartialOutputError, SpecError
from pipeline.lazy import lazy
from pipeline.ledger import ANSWER_COLUMNS as _LEDGER_ORDER
from pipeline.spec import OUTPUT_SUFFIXES, output_format

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
else:  # a small output is written by polars alone; pyarrow loads for chunked writes and reruns (see lazy)
    pa, pc, pq = lazy("pyarrow"), lazy("pyarrow.compute"), lazy("pyarrow.parquet")

#: The ``tool_calls`` column: the answer's function calls as sent, arguments as the model's JSON text.
TOOL_CALLS_DTYPE = pl.List(pl.Struct({"id": pl.String(), "name": pl.String(), "arguments": pl.String()}))

#: The columns seedbatch adds after the input's, with their types. One name per concept: these are
#: also the ledger's columns and the README's.
OUTPUT_COLUMNS: dict[str, pl.DataType] = {
    "content": pl.String(),
    "reasoning_content": pl.String(),
    "tool_calls": TOOL_CALLS_DTYPE,
    "finish_reason": pl.String(),
    "model": pl.String(),
    "response_id": pl.String(),
    "prompt_tokens": pl.Int64(),
    "completion_tokens": pl.Int64(),
    "total_tokens": pl.Int64(),
    "reasoning_tokens": pl.Int64(),
    "cached_tokens": pl.Int64(),
    "credits_used": pl.Float64(),
    "usd_spent": pl.Float64(),
    "status": pl.String(),
    "error": pl.String(),
    "error_kind": pl.String(),
    "attempts": pl.Int64(),
    "unconfirmed_attempts": pl.Int64(),
    "latency_ms": pl.Float64(),
    "request_hash": pl.String(),
}

AnswerLookup = Callable[[int, int], dict[int, tuple[str, tuple[Any, ...] | None]]]
TypedColumns = Callable[[Sequence[str | None], Sequence[str]], list[pl.Series]]


def check_output_path(path: Path, input_columns: Iterable[str]) -> None:
    """Fail before sending when the output cannot be written or would hide an input column."""
    clash = [c for c in input_columns if c in OUTPUT_COLUMNS]
    if clash:
        raise SpecError(
            f"input column(s) {', '.join(map(repr, clash))} clash with seedbatch's output columns; rename them"
        )
    if output_format(path.name) is None:
        raise SpecError(f"{path}: job.output must end in {_suffixes()}")
    if path.is_dir():
        raise SpecError(f"{path}: job.output is a folder; give a file name ending in {_suffixes()}")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpecError(f"{path}: cannot create the output folder ({exc.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise SpecError(f"{path}: output folder is not writable")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, moved over it only when the block ends without an error.

    Readers see the old file or the new one, never half of one (dlt's ``save_atomic``).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _suffixes() -> str:
    return f"{', '.join(OUTPUT_SUFFIXES[:-1])} or {OUTPUT_SUFFIXES[-1]}"


def write_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


_PENDING = ("pending", *(None,) * (len(_LEDGER_ORDER) - 1))


def _answer_frame(row_numbers: Sequence[int], answers: dict[int, tuple[str, tuple[Any, ...] | None]]) -> pl.DataFrame:
    # Row tuples into polars in one call: a per-cell Python loop here cost 5 s of a 1M-row rewrite.
    rows = []
    for n in row_numbers:
        request_hash, answer = answers.get(n, (None, None))
        rows.append((*(answer if answer is not None else _PENDING), request_hash))
    # The ledger keeps tool calls as JSON text; one vectorized decode turns them into the typed column.
    schema = {name: _AS_STORED.get(name, OUTPUT_COLUMNS[name]) for name in (*_LEDGER_ORDER, "request_hash")}
    frame = pl.DataFrame(rows, schema=schema, orient="row", strict=False)
    frame = frame.with_columns(pl.col("tool_calls").str.json_decode(TOOL_CALLS_DTYPE))
    return frame.select(OUTPUT_COLUMNS.keys())


def _as_text(frame: pl.DataFrame, nested_as_json: bool) -> pl.DataFrame:
    """Cells a text format cannot hold as they are: bytes as base64, and (for CSV) lists and structs as JSON."""
    casts = []
    for name, dtype in frame.schema.items():
        if dtype == pl.Binary:
            casts.append(pl.col(name).bin.encode("base64"))
        elif nested_as_json and dtype.is_nested():
            # polars encodes structs only: wrap the value as {"v": …} and keep what follows `{"v":`.
            wrapped = pl.struct(pl.col(name).alias("v")).struct.json_encode().str.slice(5).str.head(-1)
            casts.append(pl.when(pl.col(name).is_null()).then(None).otherwise(wrapped).alias(name))
    return frame.with_columns(casts) if casts else frame


#: A Parquet output's row groups hold at least this many rows (or ``ROW_GROUP_BYTES``), whatever the chunk size.
#: pyarrow's writer keeps every row group's metadata (each column's offsets and statistics) until it closes
#: the file, and serializes it all then (~47 KB a row group of the benchmark's 26 columns): with one row
#: group per 2,000-row chunk (``job.chunk_rows``) the output pass grew ~24 bytes a row, ~240 MB at 10M rows
#: (5,000 row groups, a 16 MB footer every later reader parses). Larger groups cost their buffered rows:
#: a 1M-row rerun peaked at 298 MB with 16,384 rows (as with 2,000), 337 MB with 32,768, 345 MB with 65,536.
ROW_GROUP_ROWS = 16_384
#: ... or as soon as the chunks buffered for one row group hold this many bytes (wide rows, images).
ROW_GROUP_BYTES = 16 * 1024 * 1024


class _Sink:
    """One output file being written, a chunk at a time, in the format its name asks for.

    Parquet chunks are buffered into row groups of ``ROW_GROUP_ROWS`` rows (``ROW_GROUP_BYTES``): memory is
    one row group's Arrow data, not metadata that grows with every chunk. ``finish`` writes what is left.
    The first chunk stays a polars frame until a second one comes: an output of one chunk is written by
    polars alone (the same Arrow schema), so a small job never imports pyarrow (``pipeline.lazy``).
    """

    def __init__(self, tmp: Path, fmt: str) -> None:
        self.tmp = tmp
        self.format = fmt
        self._parquet: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self._text: Any = None
        self._first: pl.DataFrame | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._pending_bytes = 0

    @property
    def started(self) -> bool:
        return self._first is not None or self._schema is not None or self._text is not None

    def write(self, frame: pl.DataFrame) -> None:
        if self.format == "parquet":
            if self._first is None and self._schema is None:
                self._first = frame
                return
            if self._first is not None:
                first, self._first = self._first, None
                self._buffer(first)
            self._buffer(frame)
            return
        first_chunk = self._text is None
        if self._text is None:
            self._text = open(self.tmp, "wb")  # noqa: SIM115 (closed by close(), after the last chunk)
        if self.format == "csv":
            _as_text(frame, nested_as_json=True).write_csv(self._text, include_header=first_chunk)
        elif frame.height:
            _as_text(frame, nested_as_json=False).write_ndjson(self._text)

    def _buffer(self, frame: pl.DataFrame) -> None:
        table = frame.to_arrow()
        if self._schema is None:
            self._schema = table.schema
        self._pending.append(table.cast(self._schema) if table.schema != self._schema else table)
        self._pending_rows += table.num_rows
        self._pending_bytes += table.nbytes
        if self._pending_rows >= ROW_GROUP_ROWS or self._pending_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        """Write the buffered chunks as one row group (an empty one only when nothing was written yet)."""
        if not self._pending or (self._pending_rows == 0 and self._parquet is not None):
            return
        assert self._schema is not None
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self.tmp, self._schema, compression="zstd")
        pending, self._pending = self._pending, []
        self._pending_rows = self._pending_bytes = 0
        table = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
        del pending
        self._parquet.write_table(table, row_group_size=max(table.num_rows, 1))

    def finish(self) -> None:
        """Write what is still buffered (call once, after the last chunk; ``close`` does not write)."""
        if self._first is not None:
            first, self._first = self._first, None
            first.write_parquet(self.tmp, compression="zstd")
            return
        self._flush()

    def close(self) -> None:
        self._first = None
        self._pending = []
        if self._parquet is not None:
            self._parquet.close()
        if self._text is not None:
            self._text.close()


_AS_STORED: dict[str, pl.DataType] = {"tool_calls": pl.String()}


def write_output(
    path: Path,
    frames: Iterable[pl.DataFrame],
    row_number_column: str,
    answers_for: AnswerLookup,
    *,
    typed: TypedColumns | None = None,
    keep: Callable[[str | None], bool] | None = None,
) -> dict[str, int]:
    """Write every input row with its answer; returns rows by status. ``keep`` filters by request hash."""
    fmt = output_format(path.name)
    if fmt is None:
        raise SpecError(f"{path}: an output must end in {_suffixes()}")
    counts: dict[str, int] = {}
    last: pl.DataFrame | None = None
    broken: InputError | None = None
    frames = iter(frames)
    with atomic_path(path) as tmp:
        sink = _Sink(tmp, fmt)
        try:
            while True:
                try:
                    frame = next(frames)
                except StopIteration:
                    break
                except InputError as exc:
                    # The input changed or broke after the pre-pass: keep the rows read so far (their answers
                    # are paid for) as a partial output, then say so.
                    if not sink.started:
                        raise
                    broken = exc
                    break
                numbers = frame.get_column(row_number_column).to_list()
                answers = answers_for(min(numbers), max(numbers))
                answer = _answer_frame(numbers, answers)
                parts = [frame.drop(row_number_column), answer]
                if typed is not None:
                    contents = answer.get_column("content").to_list()
                    parts.append(pl.DataFrame(typed(contents, answer.get_column("status").to_list())))
                out = pl.concat(parts, how="horizontal")
                if keep is not None:
                    out = out.filter(pl.Series([keep(h) for h in answer.get_column("request_hash").to_list()]))
                for status, n in out.get_column("status").value_counts().iter_rows():
                    counts[status] = counts.get(status, 0) + n
                last = out
                if out.height == 0:
                    continue
                sink.write(out)
            if not sink.started:
                if last is None:
                    raise SpecError(f"{path}: no rows selected; nothing to write")
                sink.write(last)  # no row kept: the file still says which columns there would be
            sink.finish()
        finally:
            sink.close()
    if broken is not None:
        written = sum(counts.values())
        raise PartialOutputError(
            f"{broken} (a partial output of the {written:,} rows read before it was written to {path})"
        )
    return counts


def read_output(path: Path, only_status: str | None, rows: int) -> tuple[pl.DataFrame, list[tuple[str, int]]]:
    """The first ``rows`` rows of an output file (with ``only_status``: of that status), and rows by status.

    What ``seedbatch show`` prints. A CSV output's list and struct columns come back as their JSON text.
    """
    fmt = output_format(path.name)
    if fmt is None:
        raise InputError(f"{path}: not an output file (show reads {_suffixes()})")
    try:
        if fmt == "parquet":
            lf = pl.scan_parquet(path)
        elif fmt == "csv":
            lf = pl.scan_csv(path, infer_schema_length=10_000)
        else:
            lf = pl.scan_ndjson(path, infer_schema_length=10_000)
        picked = lf.filter(pl.col("status") == only_status) if only_status else lf
        df = picked.head(rows).collect()
        counts = [] if df.height else list(lf.group_by("status").len().sort("status").collect().iter_rows())
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(f"{path}: cannot read {fmt} output ({str(exc).strip().splitlines()[0]})") from None
    return df, counts


def output_totals(path: Path) -> tuple[dict[str, int], int, int, float]:
    """Rows by status and the prompt tokens, completion tokens and USD an output's rows carry.

    A row that reused an identical row's answer carries zero usage (``answers_for_rows``), so these sums
    are what was paid. Read in batches of four columns: bounded memory at any size.
    """
    counts: dict[str, int] = {}
    prompt = completion = 0
    usd = 0.0
    columns = ["status", "prompt_tokens", "completion_tokens", "usd_spent"]
    try:
        for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=262_144, columns=columns):
            for item in pc.value_counts(batch.column(0)).to_pylist():
                counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
            prompt += pc.sum(batch.column(1)).as_py() or 0
            completion += pc.sum(batch.column(2)).as_py() or 0
            usd += pc.sum(batch.column(3)).as_py() or 0.0
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: cannot read the output: {str(exc).splitlines()[0]}") from None
    return counts, prompt, completion, usd


def _answered(
    frame: pl.DataFrame, row_number_column: str, answers_for: AnswerLookup, typed: TypedColumns | None
) -> pl.DataFrame:
    """Input rows joined with their answers: the output's rows (``write_output`` builds the same per chunk)."""
    numbers = frame.get_column(row_number_column).to_list()
    answer = _answer_frame(numbers, answers_for(min(numbers), max(numbers)))
    parts = [frame.drop(row_number_column), answer]
    if typed is not None:
        contents = answer.get_column("content").to_list()
        parts.append(pl.DataFrame(typed(contents, answer.get_column("status").to_list())))
    return pl.concat(parts, how="horizontal")


def _parquet(source: Path | pq.ParquetFile) -> pq.ParquetFile:
    """An open Parquet file. Opening parses the footer: a 10M-row output written in 2,000-row groups has
    5,000 of them, a 16 MB footer that costs ~120 MB to hold, so each patch step opens the output once."""
    return source if isinstance(source, pq.ParquetFile) else pq.ParquetFile(source, pre_buffer=False)


def _batches(
    path: Path | pq.ParquetFile, batch_size: int, columns: Sequence[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """A Parquet file's rows in record batches, one reader per few row groups (about ``batch_size`` rows).

    One ``iter_batches`` over a whole file grows the process by a few hundred MB as it goes (pyarrow 26:
    a 10M-row output's 5,000 row groups, four columns, took 124 MB to 406 MB; a reader per window of row
    groups stays near 210 MB), and a patch reads both the input and the output that way.
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
            # One thread: per-thread allocator caches held ~50 MB more when a patch read a 10M-row output.
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
                    fresh = _answered(frame.filter(mask), row_number_column, answers_for, typed)
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
