"""What an input is, as ``reader.open_input``'s check pass found it, and which of its rows a selection keeps.

Every reader of a format builds and reads an ``InputTable``; the selection helpers are shared by the
readers of every format and by the callers that size a run (``prepare``, ``runner``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from pipeline.records import Selection
from pipeline.tables.ids import IdScan

#: The column each chunk carries with the row's number in the whole input (0-based); no input may use it.
ROW_NUMBER = "__seedbatch_row"


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
    #: CSV: bytes parsed at a time, large enough for the file's longest row (``delimited.CSV_BLOCK`` or
    #: more); 0 for the formats that are not read in blocks.
    block_size: int = 0
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
    """How many rows a selection keeps."""
    if selection.sample is not None:
        return min(selection.sample, table.rows)
    if selection.limit is not None:
        return min(selection.limit, table.rows)
    return table.rows
