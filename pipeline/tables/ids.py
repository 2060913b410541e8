"""The id column's empty rows and per-row hashes, gathered chunk by chunk by the input's check pass in each
format's reader (``delimited``, ``jsonl_input``, ``parquet_input``); ``reader.check_ids`` judges them.

A CSV or JSONL column's type is known only once its whole file was read, and the hashes must be those
of the typed values (``"7"`` and ``"07"`` are one id in an integer column, two in a text one). So the
input's check pass keeps the hashes of each chunk's ids both as text and, while every value so far is
an integer, as integers; ``hashes`` gives the set that matches the type the pass found. Any other type
(float, boolean ids) has none: ``check_ids`` then reads the column once more with its type.

Empty ids are found on the text: a column whose type is integer holds no blank text (a blank field is
null, and text of spaces would have made the column text).
"""

from __future__ import annotations

import polars as pl

#: Rows named in an id error, at most.
SHOWN_ROWS = 3


class IdScan:
    """One id column, seen a chunk at a time: its empty rows and the hash of every row's id."""

    def __init__(self, column: str) -> None:
        self.column = column
        self.n_empty = 0
        #: The first ``SHOWN_ROWS`` empty rows (0-based row numbers).
        self.empty: list[int] = []
        self._text: list[pl.Series] = []
        self._integers: list[pl.Series] | None = []

    def add(self, first_row: int, text: pl.Series, integers: pl.Series | None) -> None:
        """The ids of the rows numbered from ``first_row`` as text, and as integers when every one is one
        (None: not)."""
        self._count_empty(first_row, text)
        if self.n_empty:
            return  # an empty id is the error: the hashes are no longer needed
        self._text.append(text.hash(seed=0))
        if self._integers is not None and integers is not None:
            self._integers.append(integers.hash(seed=0))
        else:
            self._integers = None

    def add_typed(self, first_row: int, ids: pl.Series) -> None:
        """The ids of the rows numbered from ``first_row``, read with the column's type already known."""
        self._count_empty(first_row, ids)
        if not self.n_empty:
            self._text.append(ids.hash(seed=0))
            self._integers = None

    def hashes(self, dtype: pl.DataType | None) -> list[pl.Series] | None:
        """Every row's id hash for a column of ``dtype`` (None: typed, as ``add_typed`` saw them); None when
        this scan cannot tell (another type)."""
        if dtype is None or dtype == pl.String:
            return self._text
        if dtype == pl.Int64 and self._integers is not None:
            return self._integers
        return None

    def _count_empty(self, first_row: int, ids: pl.Series) -> None:
        blank = ids.is_null()
        if ids.dtype == pl.String:
            blank = blank | (ids.str.strip_chars() == "")
        n = int(blank.sum())
        if n:
            self.n_empty += n
            if len(self.empty) < SHOWN_ROWS:
                rows = blank.arg_true().head(SHOWN_ROWS - len(self.empty)) + first_row
                self.empty += rows.to_list()
