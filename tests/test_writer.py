"""Writer: real Parquet files in tmp_path, answers from a real ledger."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError, SpecError
from pipeline.records import Outcome, Usage
from pipeline.state.ledger import Ledger
from pipeline.tables import writer
from pipeline.tables.writer import OUTPUT_COLUMNS, check_output_path, write_output

RN = "__row"


def frames(n: int, chunk: int) -> Iterator[pl.DataFrame]:
    full = pl.DataFrame(
        {
            RN: pl.Series(range(n), dtype=pl.UInt32),
            "zeta": [f"z{i}" for i in range(n)],
            "alpha": list(range(n)),
            "when": pl.Series([1.5 * i for i in range(n)], dtype=pl.Float32),
        }
    )
    for i in range(0, n, chunk):
        yield full.slice(i, chunk)


def _hash(i: int) -> str:
    return f"{i:032x}"


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    """Rows 0..5 mapped; rows 0, 2, 4 answered (0 ok, 2 error, 4 invalid_output); row 5 unmapped."""
    led = Ledger(tmp_path / "l.sqlite", "test")
    led.map_rows([(i, _hash(i)) for i in range(5)])
    led.add(
        Outcome(
            _hash(0),
            "ok",
            content='{"n": 1}',
            finish_reason="stop",
            model="m",
            response_id="id0",
            usage=Usage(10, 5, 15, 2, 0, 30.0, 1.5e-5),
            attempts=1,
            latency_ms=12.5,
        ),
        "r",
    )
    led.add(Outcome(_hash(2), "error", error="HTTP 400", error_kind="http_400", attempts=1), "r")
    led.add(Outcome(_hash(4), "invalid_output", content="nope", error="not JSON", attempts=3), "r")
    led.flush()
    yield led
    led.close()


def test_columns_dtypes_and_values(tmp_path: Path, ledger: Ledger) -> None:
    out = tmp_path / "out.parquet"
    counts = write_output(out, frames(6, 4), RN, ledger.answers_for_rows)
    assert counts == {"ok": 1, "error": 1, "invalid_output": 1, "pending": 3}
    df = pl.read_parquet(out)
    # Input columns first, in input order, with their own types; then exactly OUTPUT_COLUMNS.
    assert df.columns == ["zeta", "alpha", "when", *OUTPUT_COLUMNS]
    assert df.schema["alpha"] == pl.Int64
    assert df.schema["when"] == pl.Float32
    for name, dtype in OUTPUT_COLUMNS.items():
        assert df.schema[name] == dtype, name
    assert df.height == 6
    assert df.get_column("zeta").to_list() == [f"z{i}" for i in range(6)]
    assert df.get_column("status").to_list() == ["ok", "pending", "error", "pending", "invalid_output", "pending"]
    row0 = df.row(0, named=True)
    assert row0["content"] == '{"n": 1}'
    assert (row0["prompt_tokens"], row0["completion_tokens"], row0["total_tokens"]) == (10, 5, 15)
    assert (row0["reasoning_tokens"], row0["cached_tokens"]) == (2, 0)
    assert row0["credits_used"] == 30.0
    assert row0["usd_spent"] == pytest.approx(1.5e-5)
    assert row0["latency_ms"] == 12.5
    assert row0["request_hash"] == _hash(0)
    # Mapped but unanswered: pending, with its hash. Not mapped at all: pending, no hash.
    row1 = df.row(1, named=True)
    assert row1["request_hash"] == _hash(1)
    assert all(row1[c] is None for c in OUTPUT_COLUMNS if c not in ("status", "request_hash"))
    row5 = df.row(5, named=True)
    assert (row5["status"], row5["request_hash"]) == ("pending", None)
    assert df.row(2, named=True)["error_kind"] == "http_400"
    assert df.row(4, named=True)["attempts"] == 3


def test_parquet_schema_is_the_same_when_first_chunk_is_all_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "ROW_GROUP_ROWS", 2)  # a row group per chunk: the second is cast to the first
    led = Ledger(tmp_path / "l.sqlite", "test")
    led.map_rows([(i, _hash(i)) for i in range(4)])
    led.add(Outcome(_hash(3), "ok", content="x", usage=Usage(1, 2, 3), attempts=1, latency_ms=1.0), "r")
    led.flush()
    out = tmp_path / "out.parquet"
    write_output(out, frames(4, 2), RN, led.answers_for_rows)
    led.close()
    meta = pq.ParquetFile(out)
    assert meta.metadata.num_row_groups == 2
    df = pl.read_parquet(out)
    assert [df.schema[c] for c in OUTPUT_COLUMNS] == list(OUTPUT_COLUMNS.values())
    assert df.get_column("total_tokens").to_list() == [None, None, None, 3]


def test_one_chunk_written_by_polars_equals_the_chunked_pyarrow_file(
    tmp_path: Path, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An output of one chunk is written by polars alone (no pyarrow import for a small job): same Arrow
    schema, same values and the same counts as the chunk-by-chunk pyarrow writer gives."""
    one, many = tmp_path / "one.parquet", tmp_path / "many.parquet"
    counts = write_output(one, frames(6, 6), RN, ledger.answers_for_rows)
    monkeypatch.setattr(writer, "ROW_GROUP_ROWS", 1)  # a row group per chunk: pyarrow writes them
    assert write_output(many, frames(6, 2), RN, ledger.answers_for_rows) == counts
    assert pq.ParquetFile(one).metadata.num_row_groups == 1
    assert pq.ParquetFile(many).metadata.num_row_groups == 3
    assert pq.read_schema(one) == pq.read_schema(many)
    assert pl.read_parquet(one).equals(pl.read_parquet(many))


def _row_groups(path: Path) -> list[int]:
    meta = pq.ParquetFile(path).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def test_parquet_row_groups_span_chunks(tmp_path: Path, ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks are buffered into row groups of ``ROW_GROUP_ROWS``: the same rows and values as one row group
    per chunk (what the writer did before), in a file whose metadata does not grow with every chunk."""
    one_group = tmp_path / "one.parquet"
    counts = write_output(one_group, frames(6, 2), RN, ledger.answers_for_rows)
    assert _row_groups(one_group) == [6]
    monkeypatch.setattr(writer, "ROW_GROUP_ROWS", 1)
    per_chunk = tmp_path / "per_chunk.parquet"
    assert write_output(per_chunk, frames(6, 2), RN, ledger.answers_for_rows) == counts
    assert _row_groups(per_chunk) == [2, 2, 2]
    monkeypatch.setattr(writer, "ROW_GROUP_ROWS", 4)
    uneven = tmp_path / "uneven.parquet"
    assert write_output(uneven, frames(6, 3), RN, ledger.answers_for_rows) == counts
    assert _row_groups(uneven) == [6]  # a row group closes at the first chunk that reaches the size
    five = tmp_path / "five.parquet"
    five_counts = {"ok": 1, "error": 1, "invalid_output": 1, "pending": 2}
    assert write_output(five, frames(5, 2), RN, ledger.answers_for_rows) == five_counts
    assert _row_groups(five) == [4, 1]  # the rest is written when the last chunk was read
    expected = pl.read_parquet(per_chunk)
    assert pl.read_parquet(one_group).equals(expected)
    assert pl.read_parquet(uneven).equals(expected)
    assert pl.read_parquet(five).equals(expected.head(5))


def test_parquet_row_group_closes_at_its_byte_size(
    tmp_path: Path, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wide rows (images, long texts) close a row group by bytes before ``ROW_GROUP_ROWS`` rows."""
    monkeypatch.setattr(writer, "ROW_GROUP_BYTES", 1)
    out = tmp_path / "out.parquet"
    write_output(out, frames(6, 2), RN, ledger.answers_for_rows)
    assert _row_groups(out) == [2, 2, 2]


def test_no_temp_file_left_and_overwrite_replaces(tmp_path: Path, ledger: Ledger) -> None:
    out = tmp_path / "out.parquet"
    write_output(out, frames(6, 4), RN, ledger.answers_for_rows)
    write_output(out, frames(3, 4), RN, ledger.answers_for_rows)
    assert pl.read_parquet(out).height == 3
    assert sorted(p.name for p in tmp_path.iterdir() if "out" in p.name) == ["out.parquet"]


def test_crash_mid_write_leaves_old_output_intact(tmp_path: Path, ledger: Ledger) -> None:
    out = tmp_path / "out.parquet"
    write_output(out, frames(6, 4), RN, ledger.answers_for_rows)
    before = out.read_bytes()
    calls = 0

    def typed(contents: Sequence[str | None], statuses: Sequence[str]) -> list[pl.Series]:
        nonlocal calls
        calls += 1
        if calls == 2:  # the temp file already holds the first chunk
            raise ValueError("typed columns failed")
        return [pl.Series("n", [None] * len(contents), dtype=pl.Int64)]

    with pytest.raises(ValueError, match="typed columns failed"):
        write_output(out, frames(6, 2), RN, ledger.answers_for_rows, typed=typed)
    assert calls == 2
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.parquet.tmp")] == []


def test_input_that_breaks_while_writing_leaves_a_partial_output(tmp_path: Path, ledger: Ledger) -> None:
    """The input changed after the pre-pass: the rows read so far are written, and the error says so."""
    out = tmp_path / "out.parquet"

    def breaking() -> Iterator[pl.DataFrame]:
        yield from frames(4, 2)
        raise InputError("in.csv: line 6: 4 fields but the header has 3; quote the field or remove the extra comma")

    with pytest.raises(InputError, match=r"line 6: .* \(a partial output of the 4 rows read before it was written"):
        write_output(out, breaking(), RN, ledger.answers_for_rows)
    assert pl.read_parquet(out).height == 4


def test_typed_columns_come_last(tmp_path: Path, ledger: Ledger) -> None:
    out = tmp_path / "out.parquet"

    def typed(contents: Sequence[str | None], statuses: Sequence[str]) -> list[pl.Series]:
        return [pl.Series("n", [1 if s == "ok" else None for s in statuses], dtype=pl.Int32)]

    write_output(out, frames(6, 4), RN, ledger.answers_for_rows, typed=typed)
    df = pl.read_parquet(out)
    assert df.columns[-1] == "n"
    assert df.columns[:3] == ["zeta", "alpha", "when"]
    assert df.get_column("n").to_list() == [1, None, None, None, None, None]


def test_keep_filters_rows_and_counts(tmp_path: Path, ledger: Ledger) -> None:
    out = tmp_path / "run.parquet"
    counts = write_output(out, frames(6, 4), RN, ledger.answers_for_rows, keep=lambda h: h == _hash(2))
    assert counts == {"error": 1}
    df = pl.read_parquet(out)
    assert df.get_column("zeta").to_list() == ["z2"]


def test_keep_nothing_still_writes_an_empty_typed_file(tmp_path: Path, ledger: Ledger) -> None:
    out = tmp_path / "run.parquet"
    counts = write_output(out, frames(6, 4), RN, ledger.answers_for_rows, keep=lambda h: False)
    assert counts == {}
    df = pl.read_parquet(out)
    assert df.height == 0
    assert df.columns == ["zeta", "alpha", "when", *OUTPUT_COLUMNS]


def test_no_frames_is_a_spec_error_and_writes_nothing(tmp_path: Path, ledger: Ledger) -> None:
    out = tmp_path / "out.parquet"
    with pytest.raises(SpecError, match="no rows selected"):
        write_output(out, iter(()), RN, ledger.answers_for_rows)
    assert list(tmp_path.glob("*out.parquet*")) == []


# ----------------------------------------------------------------- check_output_path


def test_check_output_path_accepts_parquet_and_pq(tmp_path: Path) -> None:
    check_output_path(tmp_path / "new" / "dir" / "o.parquet", ["text", "id"])
    assert (tmp_path / "new" / "dir").is_dir()
    check_output_path(tmp_path / "o.PQ", [])


@pytest.mark.parametrize("column", ["status", "content", "request_hash", "usd_spent"])
def test_check_output_path_rejects_clashing_input_columns(tmp_path: Path, column: str) -> None:
    with pytest.raises(SpecError) as info:
        check_output_path(tmp_path / "o.parquet", ["text", column])
    assert repr(column) in str(info.value)
    assert "rename" in str(info.value)


@pytest.mark.parametrize("name", ["o.xlsx", "o.parquet.bak", "o"])
def test_check_output_path_rejects_other_suffixes(tmp_path: Path, name: str) -> None:
    with pytest.raises(SpecError, match=r"must end in \.parquet, \.csv or \.jsonl"):
        check_output_path(tmp_path / name, ["text"])


def test_check_output_path_parent_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SpecError, match="cannot create the output folder"):
        check_output_path(blocker / "o.parquet", ["text"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_check_output_path_unwritable_folder(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(SpecError, match="not writable"):
            check_output_path(ro / "o.parquet", ["text"])
    finally:
        ro.chmod(0o700)


def test_check_output_path_unwritable_folder_as_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root bypasses file modes, so simulate what ``os.access`` reports for a read-only folder."""
    real_access = os.access
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode))
    with pytest.raises(SpecError, match="not writable"):
        check_output_path(ro / "o.parquet", ["text"])
