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
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError, PartialOutputError, SpecError
from pipeline.ledger import ANSWER_COLUMNS as _LEDGER_ORDER
from pipeline.spec import OUTPUT_SUFFIXES, output_format

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


class _Sink:
    """One output file being written, a chunk at a time, in the format its name asks for."""

    def __init__(self, tmp: Path, fmt: str) -> None:
        self.tmp = tmp
        self.format = fmt
        self._parquet: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self._text: Any = None

    @property
    def started(self) -> bool:
        return self._parquet is not None or self._text is not None

    def write(self, frame: pl.DataFrame) -> None:
        if self.format == "parquet":
            table = frame.to_arrow()
            if self._parquet is None:
                self._schema = table.schema
                self._parquet = pq.ParquetWriter(self.tmp, table.schema, compression="zstd")
            assert self._schema is not None
            self._parquet.write_table(table.cast(self._schema) if table.schema != self._schema else table)
            return
        first = self._text is None
        if self._text is None:
            self._text = open(self.tmp, "wb")  # noqa: SIM115 (closed by close(), after the last chunk)
        if self.format == "csv":
            _as_text(frame, nested_as_json=True).write_csv(self._text, include_header=first)
        elif frame.height:
            _as_text(frame, nested_as_json=False).write_ndjson(self._text)

    def close(self) -> None:
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
