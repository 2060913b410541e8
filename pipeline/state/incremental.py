"""Incremental runs: when only the input changed since the output was built, redo only the changed rows.

``uptodate.patchable`` says the job, ledger, output and version are the ones the output was built
from. Then one pass compares every selected input row with its copy in the output (``changed_rows``,
which is also the pass that parses every row before anything is sent); the rows to redo alone are
rendered, looked up, sent when not answered, and patched into the output, every other row is copied
as it is. A rerun of a 1M-row job after one row changed then costs a read of the input and the output
and a write of the output, not 1M renders, 1M ledger lookups and a 1M-row join.

The output gives a repeated request's answer with its usage to the first row asking it, and the same
answer at zero usage to every later one; a changed row can therefore move usage to a row that did not
change (it was the first asker of its old request, or its new request is asked by an earlier row).
So the rows to redo are the changed rows and every row asking any of their requests, old or new (an
unchanged row asks the same request as before, so the output's ``request_hash`` column finds them).
That set is closed: every row asking one of its requests is in it, so the run's row map holds all of a
request's askers and gives its usage to the same first row a full rebuild would; a row outside it asks
a request no changed row asks, before or now, and keeps its cells. The redone unchanged rows are
answered from the ledger (nothing is sent for them). When that set is larger than
``MAX_CHANGED_FRACTION`` of the rows (and ``MIN_LIMIT``), rows were removed, or the columns changed,
the run rebuilds the whole output from the input and the ledger.
"""

from __future__ import annotations

from dataclasses import replace

from pipeline.requests.prepare import Prepared, iter_requests
from pipeline.state.patching import changed_positions, sharing_rows
from pipeline.tables.reader import ROW_NUMBER, read_frames

#: Rows per frame when comparing and patching: vectorized work, so large frames (memory: a few tens of MB).
PATCH_CHUNK_ROWS = 16_384
#: More changed rows than this fraction of the selected rows (and than ``MIN_LIMIT``): rebuild everything.
MAX_CHANGED_FRACTION = 0.1
MIN_LIMIT = 1000


def changed_rows(p: Prepared) -> frozenset[int] | None:
    """The row numbers to redo, or None when the whole output must be rebuilt (see the module docstring)."""
    spec = p.spec
    limit = max(MIN_LIMIT, int(p.rows * MAX_CHANGED_FRACTION))
    frames = read_frames(p.table, p.selection, PATCH_CHUNK_ROWS)
    changed = changed_positions(spec.job.output, frames, ROW_NUMBER, PATCH_CHUNK_ROWS, limit)
    if changed is None:
        return None
    rows = frozenset(changed)
    if not rows:
        return rows
    new_hashes = {r.request_hash for chunk in iter_requests(replace(p, only_rows=rows)) for r in chunk}
    sharing = sharing_rows(spec.job.output, set(rows), new_hashes, limit)
    if sharing is None:
        return None  # the rows asking the changed rows' requests are too many to patch
    rows = rows.union(sharing)
    return rows if len(rows) <= limit else None
