"""The commands that look without sending: ``plan`` (what a run would send and cost), ``status`` (what the
ledger holds) and ``show`` (a few rows of an output)."""

from __future__ import annotations

from typing import Any

import click

from pipeline.cli.common import debug_opt, guarded, job_arg, load_job, override_opts, selection, selection_opts


@click.command()
@job_arg
@override_opts
@selection_opts
@click.option("--retry-errors", is_flag=True, help="Count rows with errors as to be sent.")
@debug_opt
@guarded
def plan(
    job: str, limit: int | None, sample: int | None, sample_seed: int, retry_errors: bool, debug: bool, **overrides: Any
) -> None:
    """Show what JOB would send and cost, without sending anything."""
    from pipeline.cli.reports import plan_lines
    from pipeline.planning import plan_job

    spec = load_job(job, **overrides)
    p = plan_job(spec, selection(limit, sample, sample_seed), retry_errors=retry_errors)
    for line in plan_lines(spec, job, p):
        click.echo(line)
    from pipeline.job.stages import uses_stages

    if uses_stages(spec.votes, spec.escalation):
        from pipeline.planning import plan_stages, stages_lines

        for line in stages_lines(plan_stages(spec, selection(limit, sample, sample_seed), retry_errors=retry_errors)):
            click.echo(line)


@click.command()
@job_arg
@override_opts
@selection_opts
@debug_opt
@guarded
def status(job: str, limit: int | None, sample: int | None, sample_seed: int, debug: bool, **overrides: Any) -> None:
    """Rows done / failed / pending for JOB, from the ledger and the input. Sends nothing."""
    from pipeline.cli.reports import status_lines
    from pipeline.planning import job_status

    spec = load_job(job, **overrides)
    s = job_status(spec, selection(limit, sample, sample_seed))
    for line in status_lines(spec, job, s):
        click.echo(line)


@click.command()
@click.argument("output")
@click.option("--rows", "n", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--status", "only_status", default=None, help="Only rows with this status.")
@click.option("--width", type=int, default=100, show_default=True, help="Truncate values to this many characters.")
@debug_opt
@guarded
def show(output: str, n: int, only_status: str | None, width: int, debug: bool) -> None:
    """Print a few rows of an OUTPUT file (.parquet, .csv, .jsonl; a path or s3://bucket/key) readably."""
    from pipeline.job.spec import expand_home
    from pipeline.tables.output_tables import read_output_at

    output = expand_home(output)
    df, counts = read_output_at(output, only_status, n)
    if df.height == 0 and only_status:
        found = ", ".join(f"{s}={c}" for s, c in counts) or "none"
        click.echo(f"no rows with status {only_status!r} in {output} (statuses there: {found})")
        return
    for i, row in enumerate(df.iter_rows(named=True)):
        click.echo(f"── row {i + 1} " + "─" * 40)
        for key, value in row.items():
            if value is None:
                continue
            text = str(value).replace("\n", " ⏎ ")
            click.echo(f"  {key:<22} {text[:width]}{'…' if len(text) > width else ''}")
