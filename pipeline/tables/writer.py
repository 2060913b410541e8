"""Input rows + ledger answers → one output file (Parquet, CSV or JSONL), written atomically, chunk by chunk.

A run that does not patch (``patching``) writes its output whole from the input and the ledger, so it
always matches the ledger; a crash mid-write leaves the previous output untouched (temp file, then
``os.replace``). The answer columns and their types are ``answers.record``'s.
The format follows the file's extension (``spec.OUTPUT_FORMATS``): Parquet keeps every type; CSV has
no nested values, so list and struct columns are written there as JSON text (``json.loads`` gives the
value back); JSONL keeps nesting. Binary cells (images read from a Parquet input) are base64 text in
CSV and JSONL, which have no bytes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from pipeline.answers.record import ANSWER_COLUMNS, ANSWER_FIELDS, KEY, OUTPUT_COLUMNS, TOOL_CALLS_DTYPE
from pipeline.errors import InputError, PartialOutputError, SpecError
from pipeline.job.spec import OUTPUT_SUFFIXES, output_format
from pipeline.lazy import lazy

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq
else:  # a small output is written by polars alone; pyarrow loads for chunked writes (see lazy)
    pa, pq = lazy("pyarrow"), lazy("pyarrow.parquet")

__all__ = [
    "CEDED_COLUMNS",
    "OUTPUT_COLUMNS",
    "TOOL_CALLS_DTYPE",
    "AnswerLookup",
    "TypedColumns",
    "answered_rows",
    "atomic_path",
    "check_output_path",
    "write_atomic",
    "write_output",
]

AnswerLookup = Callable[[int, int], dict[int, tuple[str, tuple[Any, ...] | None]]]
TypedColumns = Callable[[Sequence[str | None], Sequence[str]], list[pl.Series]]


#: seedbatch's columns that an input column or a schema field of the same name takes over, unless the job
#: asks for what fills them (``confidence``: ``[model.extra] logprobs = true``). A column users commonly
#: have already (a model's self-rated ``confidence``) keeps its name in every job that does not need ours.
CEDED_COLUMNS = ("confidence",)


def check_output_path(path: Path, input_columns: Iterable[str], *, kept: Iterable[str] = CEDED_COLUMNS) -> None:
    """Fail before sending when the output cannot be written or would hide an input column.

    ``kept``: the ``CEDED_COLUMNS`` an input column may not take (those the job fills itself)."""
    ceded = set(CEDED_COLUMNS) - set(kept)
    clash = [c for c in input_columns if c in OUTPUT_COLUMNS and c not in ceded]
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


#: The answer columns of a row whose request was not answered (the run stopped first).
_PENDING = tuple("pending" if name == "status" else None for name in ANSWER_COLUMNS)
#: The answer columns as the ledger hands them over (nested values as JSON text), then the key.
_AS_STORED = {f.name: f.stored_dtype for f in ANSWER_FIELDS if f.output and f.name != KEY} | {KEY: pl.String()}
#: Columns the ledger keeps as JSON text: one vectorized decode each gives the typed column.
_DECODED = [pl.col(f.name).str.json_decode(f.dtype) for f in ANSWER_FIELDS if f.output and f.dtype.is_nested()]


def _answer_frame(row_numbers: Sequence[int], answers: dict[int, tuple[str, tuple[Any, ...] | None]]) -> pl.DataFrame:
    # Row tuples into polars in one call: a per-cell Python loop would be most of a large output's write.
    rows = []
    for n in row_numbers:
        request_hash, answer = answers.get(n, (None, None))
        rows.append((*(answer if answer is not None else _PENDING), request_hash))
    frame = pl.DataFrame(rows, schema=_AS_STORED, orient="row", strict=False)
    return frame.with_columns(_DECODED).select(OUTPUT_COLUMNS.keys())


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
#: the file, and serializes it all then: one row group per chunk (``job.chunk_rows``) would make the write's
#: memory and the footer every later reader parses grow with the row count. Larger groups cost their
#: buffered rows; at this size the buffer is no larger than a chunked write's other working memory.
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


def answered_rows(
    frame: pl.DataFrame, row_number_column: str, answers_for: AnswerLookup, typed: TypedColumns | None
) -> pl.DataFrame:
    """Input rows joined with their answers: the output's rows (a chunk of them).

    ``confidence`` yields to an input column or a typed field of that name (``CEDED_COLUMNS``): a job
    that asks for log-probabilities has such a clash refused before anything is sent
    (``prepare``), so the column a job without them drops is seedbatch's empty one.
    """
    numbers = frame.get_column(row_number_column).to_list()
    answer = _answer_frame(numbers, answers_for(min(numbers), max(numbers)))
    parts = [frame.drop(row_number_column), answer]
    if typed is not None:
        contents = answer.get_column("content").to_list()
        parts.append(pl.DataFrame(typed(contents, answer.get_column("status").to_list())))
    ceded = [c for c in CEDED_COLUMNS if c in parts[0].columns or (len(parts) > 2 and c in parts[2].columns)]
    if ceded:
        parts[1] = answer.drop(ceded)
    return pl.concat(parts, how="horizontal")


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
                    # The input changed or broke after its check pass: keep the rows read so far (their answers
                    # are paid for) as a partial output, then say so.
                    if not sink.started:
                        raise
                    broken = exc
                    break
                out = answered_rows(frame, row_number_column, answers_for, typed)
                if keep is not None:
                    out = out.filter(pl.Series([keep(h) for h in out.get_column(KEY).to_list()]))
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
