"""Where a job's requests are sent from, behind one protocol: this process (``local``) or Ray shards (``ray``).

An executor gets the prepared job, the ledger, the options, the summary to count into and the endpoint's
URL. It sends what the ledger lacks, commits every answer there before counting it, maps every selected
row to its request hash (for the output), and records why it stopped early in the summary. The runner
writes the output afterwards; executors never touch the output file.
"""

from __future__ import annotations

from typing import Protocol

from pipeline.job.spec import JobSpec
from pipeline.options import RunOptions
from pipeline.records import RunTally
from pipeline.requests.prepare import Prepared
from pipeline.state.ledger import Ledger


class Executor(Protocol):
    async def __call__(self, p: Prepared, ledger: Ledger, options: RunOptions, summary: RunTally, url: str) -> None:
        """Send what ``ledger`` lacks for ``p``; see the module docstring for the contract."""


def executor_for(spec: JobSpec) -> Executor:
    """``executor.kind``'s executor; Ray is imported only when asked for (it is an optional extra)."""
    if spec.executor.kind == "ray":
        from pipeline.executors.ray import execute_ray, require_ray

        require_ray(spec)
        return execute_ray
    from pipeline.executors.local import execute_local

    return execute_local
