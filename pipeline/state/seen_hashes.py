"""Which request hashes a pass has met already, in bounded memory: ``plan`` counts duplicates with it."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence

#: Hashes per ``IN (…)`` lookup: SQLite's bound-parameter limit is 32,766.
_IN_BATCH = 5000


class SeenHashes:
    """A set of request hashes on disk (SQLite's private temporary database): memory stays at its page
    cache whatever the number of rows, so ``plan`` counts duplicates over 10M rows in bounded memory."""

    def __init__(self) -> None:
        self.db = sqlite3.connect("", isolation_level=None)
        self.db.execute("CREATE TABLE seen (h BLOB PRIMARY KEY) WITHOUT ROWID")

    def add_new(self, hashes: Sequence[str]) -> set[str]:
        """Add ``hashes``; return those not seen before (in this call or an earlier one)."""
        distinct = list(dict.fromkeys(hashes))
        old: set[str] = set()
        for i in range(0, len(distinct), _IN_BATCH):
            part = [bytes.fromhex(h) for h in distinct[i : i + _IN_BATCH]]
            marks = ",".join("?" * len(part))
            old.update(r[0].hex() for r in self.db.execute(f"SELECT h FROM seen WHERE h IN ({marks})", part))
        new = [h for h in distinct if h not in old]
        with contextlib.suppress(sqlite3.Error):
            self.db.execute("BEGIN")
        self.db.executemany("INSERT INTO seen VALUES (?)", [(bytes.fromhex(h),) for h in new])
        self.db.execute("COMMIT")
        return set(new)

    def close(self) -> None:
        self.db.close()
