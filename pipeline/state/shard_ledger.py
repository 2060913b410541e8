"""A Ray shard's own ledger file: one writer per file, so shards on many nodes never contend for a lock.

The driver merges each shard's file into the job's ledger (``Ledger.merge``) once every shard ended.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.records import Outcome
from pipeline.state.ledger import Ledger


class ShardLedger(Ledger):
    """One Ray shard's own ledger file; answers in the job's main ledger count as already known.

    The row map is a real table here (not a temp one): the driver merges it to write the output.
    """

    def __init__(self, path: Path, main_path: Path, endpoint: str) -> None:
        super().__init__(path, endpoint)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS shard_rows (row_number INTEGER PRIMARY KEY, request_hash TEXT) WITHOUT ROWID"
        )
        self.main = Ledger(main_path, endpoint)  # read only here: the driver writes it after every shard ended

    def known_runs(self, hashes: Sequence[str], run_id: str | None = None) -> dict[str, tuple[str, str | None, str]]:
        found = self.main.known_runs(hashes, run_id)
        found.update(super().known_runs(hashes, run_id))  # the shard's answers are newer
        return found

    def get(self, request_hash: str) -> Outcome | None:
        return super().get(request_hash) or self.main.get(request_hash)

    def map_rows(self, pairs: Sequence[tuple[int, str]]) -> None:
        with self._transaction():
            self.db.executemany("INSERT OR REPLACE INTO shard_rows VALUES (?, ?)", pairs)

    def close(self) -> None:
        super().close()
        self.main.close()
