"""``seedbatch run``: decide what the run has to do, send it, print the summary, exit with the run's code."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

import click

from pipeline.cli.common import debug_opt, guarded, job_arg, load_job, override_opts, selection, selection_opts

if TYPE_CHECKING:
    from pipeline.cli.progress import Reporter
    from pipeline.job.spec import JobSpec
    from pipeline.options import RunOptions
    from pipeline.records import RunSummary
    from pipeline.state.decision import Decision


@click.command()
@job_arg
@override_opts
@selection_opts
@click.option(
    "--retry-errors", is_flag=True, help="Re-send rows whose last answer was an error, invalid, refused or truncated."
)
@click.option("--fresh", is_flag=True, help="Ignore answers in the ledger and pay for every row again.")
@click.option("--yes", is_flag=True, help="Do not ask before --fresh.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
)
@click.option("--progress/--no-progress", default=None, help="Live display (default: when stderr is a terminal).")
@click.option(
    "--progress-interval",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds between progress log lines when not live.",
)
@debug_opt
@guarded
def run(
    job: str,
    limit: int | None,
    sample: int | None,
    sample_seed: int,
    retry_errors: bool,
    fresh: bool,
    yes: bool,
    log_format: str,
    log_level: str,
    progress: bool | None,
    progress_interval: float,
    debug: bool,
    **overrides: Any,
) -> None:
    """Run JOB (a TOML file): send what the ledger lacks, write the output Parquet and manifest."""
    from pipeline.cli.progress import Reporter
    from pipeline.cli.reports import up_to_date_fields
    from pipeline.state.decision import UpToDate, decide

    _configure_logging(log_level)
    spec = load_job(job, **overrides)
    if spec.evaluation is not None:  # a gold column or file that is not there stops the run before it pays
        from pipeline.quality.gold import check

        check(spec)
    _confirm_fresh(spec, fresh, yes)
    rows = selection(limit, sample, sample_seed)
    from pipeline.job.stages import uses_stages

    stages = uses_stages(spec.votes, spec.escalation)  # its output is rebuilt from its stages' own runs
    # Decided once, before polars loads: only a run with work to do pays for the imports.
    decision = None if stages else decide(spec, rows, fresh=fresh, retry_errors=retry_errors)
    if isinstance(decision, UpToDate):
        Reporter(live=False, log_format=log_format).log("up_to_date", up_to_date_fields(decision.summary))
        sys.exit(decision.summary.exit_code)
    from pipeline.runner import RunOptions  # loads polars and the sending stack: only a run with work to do

    live = sys.stderr.isatty() if progress is None else progress
    with Reporter(live=live and log_format == "text", log_format=log_format) as reporter:
        options = RunOptions(
            selection=rows,
            retry_errors=retry_errors,
            fresh=fresh,
            progress=reporter if progress is not False else None,  # --no-progress: no progress lines either
            progress_interval_s=0.25 if live else progress_interval,
            log=lambda message: reporter.log("notice", {"message": message}),
        )
        summary = _send(spec, options, decision, stages)
    _print_summary(reporter, summary)
    # A job in stages that stopped early wrote no output this run: the file there is an older run's.
    if spec.evaluation is not None and summary.output_path is not None:
        from pipeline.quality.evaluate import after_run

        after_run(spec, reporter.log, log_format == "json")
    sys.exit(summary.exit_code)


def _configure_logging(log_level: str) -> None:
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr)
    # httpx logs one INFO line per request: noise at 10k rows, and its transport's debug lines can
    # echo request details. Our own progress and summary lines say what matters.
    for name in ("httpx", "httpcore", "aiohttp"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _confirm_fresh(spec: JobSpec, fresh: bool, yes: bool) -> None:
    """``--fresh`` pays for every row again: asked at a terminal, refused elsewhere without ``--yes``."""
    if fresh and not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("--fresh re-pays every row; add --yes to confirm when not at a terminal")
        click.confirm(f"--fresh ignores {spec.ledger_path} and pays for every row again. Continue?", abort=True)


def _send(spec: JobSpec, options: RunOptions, decision: Decision | None, stages: bool) -> RunSummary:
    """The job's one run, or its stages' runs (votes, escalation); SIGINT/SIGTERM stop either."""
    from pipeline.cli.common import stop_on_signals

    with stop_on_signals(options.stop):
        if stages:
            from pipeline.quality.voting import run_stages

            return run_stages(spec, options)
        from pipeline.runner import run_job

        return run_job(spec, options, decision)


def _print_summary(reporter: Reporter, summary: RunSummary) -> None:
    """The summary line, one line per kind of error (a count and one example), and why the run stopped."""
    from pipeline.cli.reports import summary_fields

    reporter.log("summary", summary_fields(summary))
    for kind, n in sorted(summary.errors_by_kind.items()):
        reporter.log("errors", {"kind": kind, "count": n, "example": summary.error_examples.get(kind, "")})
    if summary.stop_reason:
        reporter.log("stopped", {"reason": summary.stop_reason})
