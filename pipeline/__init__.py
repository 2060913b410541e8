"""seedbatch: run chat-completion jobs over tables, rate-limited, resumable, typed Parquet out."""

from __future__ import annotations

__version__ = "0.1.0"

from pipeline.errors import SeedbatchError
from pipeline.records import RunSummary
from pipeline.spec import JobSpec, load_spec


def run_job(spec: JobSpec, options: object | None = None, **kwargs: object) -> RunSummary:
    """Run a job; see ``pipeline.runner.run_job`` (imported lazily to keep ``import pipeline`` light)."""
    from pipeline.runner import run_job as _run_job

    return _run_job(spec, options, **kwargs)  # type: ignore[arg-type]


__all__ = ["JobSpec", "RunSummary", "SeedbatchError", "__version__", "load_spec", "run_job"]
