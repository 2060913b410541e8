"""``seedbatch init``: a commented starter job for an input table."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import debug_opt, guarded


@click.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--job",
    "job_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the job (default: jobs/<input name>.toml).",
)
@click.option("--schema", is_flag=True, help="Also write a JSON Schema stub (jobs/schemas/<name>.json) and use it.")
@click.option("--force", is_flag=True, help="Overwrite the job (and schema) if they exist.")
@debug_opt
@guarded
def init(input_path: Path, job_path: Path | None, schema: bool, force: bool, debug: bool) -> None:
    """Write a commented starter job for INPUT (.parquet, .csv, .tsv, .jsonl, compressed .gz/.zst text, or an
    OpenAI Batch input file)."""
    from pipeline.job.spec import expand_home
    from pipeline.starter import starter_job, table_stem

    input_path = Path(expand_home(str(input_path)))
    job_path = Path(expand_home(str(job_path))) if job_path else Path("jobs") / f"{table_stem(input_path)}.toml"
    made = starter_job(input_path, job_path, schema=schema, force=force)
    click.echo(f"wrote {made.job} ({made.kind}: {len(made.columns)} input column(s))")
    if made.schema is not None:
        click.echo(f"wrote {made.schema} (a stub: put the fields you want back in it)")
    click.echo(f"next: seedbatch plan {made.job}")
