"""Delimited text as people have it: tabs, semicolons, .tsv, and gzip/zstd compressed CSV, TSV and JSONL."""

from __future__ import annotations

import gzip
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.localapi import LocalAPI
from pipeline.records import ExitCode, Selection
from pipeline.tables import delimited, input_bytes
from pipeline.tables.reader import DelimiterGuess, open_input, read_rows

ROWS = [("r-1", "Boils fast, and quietly."), ("r-2", 'Too "dim"; returned it.'), ("r-3", "Fine.\nTwo lines.")]


def text(sep: str) -> str:
    def field(v: str) -> str:
        return f'"{v.replace(chr(34), chr(34) * 2)}"' if any(c in v for c in f'"\n{sep}') else v

    return f"review_id{sep}text\n" + "".join(f"{field(a)}{sep}{field(b)}\n" for a, b in ROWS)


def compress(data: bytes, path: Path) -> Path:
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        with pa.CompressedOutputStream(str(path), "zstd") as out:
            out.write(data)
    return path


def values(path: Path, delimiter: str | None = None) -> list[dict[str, object]]:
    table = open_input(path, delimiter=delimiter)
    return [r.values for chunk in read_rows(table, Selection(), 2, list(table.columns), None) for r in chunk]


EXPECTED = [{"review_id": a, "text": b} for a, b in ROWS]


@pytest.mark.parametrize(
    ("name", "sep", "delimiter"),
    [
        ("in.tsv", "\t", None),
        ("in.csv", ";", ";"),
        ("in.csv", "|", "|"),
        ("in.csv", "\t", "\t"),
        ("in.txt.csv", ",", None),
    ],
)
def test_separators(tmp_path: Path, name: str, sep: str, delimiter: str | None) -> None:
    path = tmp_path / name
    path.write_text(text(sep))
    assert values(path, delimiter) == EXPECTED


@pytest.mark.parametrize(("sep", "word", "setting"), [("\t", "tab", '"\\t"'), (";", "semicolon", '";"')])
def test_a_header_that_looks_otherwise_separated_names_the_setting(
    tmp_path: Path, sep: str, word: str, setting: str
) -> None:
    path = tmp_path / "in.csv"
    path.write_text(text(sep))
    with pytest.raises(DelimiterGuess) as info:
        open_input(path)
    assert str(info.value) == (
        f"{path}: line 1: the header reads as one column {f'review_id{sep}text'!r}, and it holds {word}s: "
        f'the file looks {word}-separated; set job.delimiter = {setting} (or "," if it is one column)'
    )
    assert info.value.delimiter == sep


@pytest.mark.parametrize("suffix", [".csv.gz", ".csv.zst", ".tsv.gz", ".tsv.zst", ".jsonl.gz", ".ndjson.zst"])
def test_compressed_inputs_read_as_they_stream(tmp_path: Path, suffix: str) -> None:
    frame = pl.DataFrame({"review_id": [a for a, _ in ROWS], "text": [b for _, b in ROWS]})
    if suffix.startswith(".jsonl") or suffix.startswith(".ndjson"):
        raw = frame.write_ndjson().encode()
    else:
        raw = text("\t" if suffix.startswith(".tsv") else ",").encode()
    path = compress(raw, tmp_path / f"in{suffix}")
    assert values(path) == EXPECTED


def test_compressed_inputs_are_never_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first chunk of a large .csv.gz comes before most of it was decompressed."""
    monkeypatch.setattr(delimited, "CSV_BLOCK", 1 << 14)
    n = 200_000
    raw = "id,text\n" + "".join(f"id-{i},row {i} row {i}\n" for i in range(n))
    path = compress(raw.encode(), tmp_path / "big.csv.gz")
    table = open_input(path)
    assert table.rows == n
    read = [0]

    class Counting(input_bytes._Decompressed):
        def readinto(self, buffer: object) -> int:
            got = super().readinto(buffer)
            read[0] += got
            return got

    monkeypatch.setattr(input_bytes, "_Decompressed", Counting)
    chunks = read_rows(table, Selection(), 100, ["text"], "id")
    assert [r.key for r in next(chunks)] == [f"id-{i}" for i in range(100)]
    assert 0 < read[0] < len(raw) / 4
    chunks.close()


@pytest.mark.parametrize(
    ("suffix", "content", "message"),
    [
        (".csv.gz", "id,text\nr-1,ok\nr-2,too,many\n", "line 3: 3 fields but the header has 2"),
        (
            ".tsv.zst",
            "id\ttext\nr-1\tok\nr-2\ttoo\tmany\n",
            "line 3: 3 fields but the header has 2; quote the field or remove the extra tab",
        ),
        (".jsonl.gz", '{"id": "r-1"}\n{"id": \n', "line 2: not valid JSON"),
        (".csv.gz", "id,text\nr-1,caf\xe9\n", "line 2: the file is not UTF-8"),
    ],
)
def test_compressed_inputs_name_their_bad_lines(tmp_path: Path, suffix: str, content: str, message: str) -> None:
    path = compress(content.encode("latin-1"), tmp_path / f"in{suffix}")
    with pytest.raises(InputError, match=message):
        open_input(path)


def test_a_cut_off_compressed_file_says_so(tmp_path: Path) -> None:
    data = gzip.compress(("id,text\n" + "".join(f"r-{i},text {i}\n" for i in range(2000))).encode())
    path = tmp_path / "in.csv.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cannot decompress this gzip file .*; check that it is complete"):
        open_input(path)


def test_runs_and_init_take_tsv_semicolons_and_compressed_files(
    tmp_path: Path, api: LocalAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    compress(text("\t").encode(), tmp_path / "data" / "reviews.tsv.gz")
    (tmp_path / "data" / "semi.csv").write_text(text(";"))
    url = ["--endpoint", "local", "--base-url", api.base_url, "--no-progress"]
    made = CliRunner().invoke(main, ["init", "data/reviews.tsv.gz"])
    assert made.exit_code == 0, made.output
    assert "wrote jobs/reviews.toml" in made.output
    ran = CliRunner().invoke(main, ["run", "jobs/reviews.toml", *url])
    assert ran.exit_code == ExitCode.OK, ran.output
    assert pl.read_parquet(tmp_path / "out" / "reviews.parquet").get_column("text").to_list() == [b for _, b in ROWS]
    # A semicolon file named .csv: init finds the separator and writes it into the job.
    made = CliRunner().invoke(main, ["init", "data/semi.csv"])
    assert made.exit_code == 0, made.output
    assert 'delimiter = ";"' in (tmp_path / "jobs" / "semi.toml").read_text()
    ran = CliRunner().invoke(main, ["run", "jobs/semi.toml", *url])
    assert ran.exit_code == ExitCode.OK, ran.output
    assert api.stats()["received"] == 6
