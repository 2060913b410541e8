"""seedbatch: run chat-completion jobs over tables, rate-limited, resumable, typed Parquet out.

The library API (the CLI is a thin shell over it)::

    from pipeline import RunOptions, Selection, Status, load_spec, run_job
    summary = run_job(load_spec("jobs/demo.toml"), RunOptions(selection=Selection(limit=20)))
    summary = await arun_job(spec)          # inside a running event loop (a notebook)
    summary.rows_by_status[Status.OK]       # a frozen RunSummary; ExitCode in summary.exit_code

``run_job``, ``arun_job``, ``load_spec`` and ``JobSpec`` are imported on first use, so ``import pipeline``
(and ``seedbatch --help``) stays light: pydantic, polars and the HTTP stack load only when a job runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from pipeline.errors import SeedbatchError
from pipeline.options import RunOptions, StopToken
from pipeline.records import ExitCode, RunSummary, Selection, Status, StopReason

if TYPE_CHECKING:
    from pipeline.job.spec import JobSpec, load_spec
    from pipeline.quality.voting import run_stages
    from pipeline.runner import arun_job, run_job

__all__ = [
    "ExitCode",
    "JobSpec",
    "RunOptions",
    "RunSummary",
    "SeedbatchError",
    "Selection",
    "Status",
    "StopReason",
    "StopToken",
    "__version__",
    "arun_job",
    "load_spec",
    "run_job",
    "run_stages",
]


_LAZY = {
    "run_job": "pipeline.runner",
    "arun_job": "pipeline.runner",
    "run_stages": "pipeline.quality.voting",
    "JobSpec": "pipeline.job.spec",
    "load_spec": "pipeline.job.spec",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
