"""``seedbatch eval``: score an output against the right answers its job names. Sends no request."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import debug_opt, guarded


@click.command("eval")
@click.argument("output")
@click.option("--job", default=None, help="The job file (default: the one OUTPUT's manifest records).")
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write one self-contained HTML page with the confusion heat maps and per-class bars.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables.")
@debug_opt
@guarded
def evaluate(output: str, job: str | None, report_path: Path | None, as_json: bool, debug: bool) -> None:
    """Score OUTPUT against the right answers the job's [evaluation] names. Sends no request."""
    from pipeline.quality.evaluate import evaluate_output

    document = evaluate_output(output, job)
    if report_path is not None:
        from pipeline.quality import report

        report.write(document, report_path)
    if as_json:
        import orjson

        click.echo(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
        return
    from pipeline.quality.terminal import print_document

    print_document(document)
    if report_path is not None:
        click.echo(f"wrote {report_path}")
