"""The ``seedbatch`` command: parse, call the library, print, map errors to exit codes. No logic."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import click

from pipeline import __version__
from pipeline.errors import SeedbatchError
from pipeline.options import StopToken
from pipeline.records import ExitCode, Selection

EXIT_USAGE = ExitCode.BAD_INPUT
EXIT_INTERNAL = ExitCode.INTERNAL


def _say_error(kind: str, message: str, exit_code: int, log_format: str) -> None:
    """One line on stderr: plain text, or a JSON object when the run logs JSON (cron log shippers)."""
    message = " ".join(message.split())
    if log_format == "json":
        import orjson

        line = orjson.dumps({"event": kind, "message": message, "exit_code": exit_code}).decode()
    else:
        line = f"seedbatch: {kind.replace('_', ' ')}: {message}"
    click.echo(line, err=True)


def _fail(exc: BaseException, debug: bool, log_format: str = "text") -> None:
    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, SeedbatchError):
        _say_error("error", str(exc), exc.exit_code, log_format)
        sys.exit(exc.exit_code)
    if isinstance(exc, click.ClickException):  # a wrong flag: the user's to fix, not a bug
        _say_error("error", exc.format_message(), EXIT_USAGE, log_format)
        sys.exit(EXIT_USAGE)
    _say_error(
        "internal_error", f"{type(exc).__name__}: {exc} (rerun with --debug for a traceback)", EXIT_INTERNAL, log_format
    )
    sys.exit(EXIT_INTERNAL)


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Errors become one line and an exit code; a traceback only with --debug."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug"))
        try:
            return fn(*args, **kwargs)
        except (SystemExit, KeyboardInterrupt, click.exceptions.Abort):
            raise
        except Exception as exc:
            _fail(exc, debug, str(kwargs.get("log_format") or "text"))

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _spec(job: str, **overrides: Any) -> Any:
    from pipeline.job.spec import load_spec

    return load_spec(job, overrides)


def _selection(limit: int | None, sample: int | None, seed: int) -> Selection:
    if limit is not None and sample is not None:
        raise click.UsageError("use --limit or --sample, not both")
    return Selection(limit=limit, sample=sample, sample_seed=seed)


@contextlib.contextmanager
def stop_on_signals(stop: StopToken) -> Iterator[None]:
    """SIGINT/SIGTERM stop the run: the first lets answers in flight finish (``grace_s``), the second
    commits what arrived and abandons the rest. Either way the output is written and the exit code is 3."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.request(f"signal {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


job_arg = click.argument("job", type=click.Path(dir_okay=False, path_type=str))
debug_opt = click.option("--debug", is_flag=True, help="Show tracebacks.")


def selection_opts(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--limit", type=click.IntRange(min=1), help="Only the first N rows.")(fn)
    fn = click.option("--sample", type=click.IntRange(min=1), help="N random rows (fixed seed).")(fn)
    fn = click.option("--sample-seed", type=int, default=0, show_default=True, help="Seed for --sample.")(fn)
    return fn


def override_opts(fn: Callable[..., Any]) -> Callable[..., Any]:
    for flag, kind, text in reversed(
        [
            ("--input", str, "Input table, a path or s3://bucket/key (overrides job.input)."),
            ("--output", str, "Output .parquet, .csv or .jsonl, a path or s3://bucket/key (overrides job.output)."),
            ("--model", str, "Model name (overrides model.name)."),
            ("--rpm", click.FloatRange(min=0, min_open=True), "Requests per minute."),
            ("--tpm", click.FloatRange(min=0, min_open=True), "Tokens per minute."),
            ("--concurrency", click.IntRange(min=1), "Requests in flight at most."),
            ("--base-url", str, "Endpoint base URL, e.g. http://127.0.0.1:8080/v1."),
            ("--endpoint", click.Choice(["aimlapi", "openai", "vllm", "llamacpp", "local"]), "Endpoint preset."),
            ("--max-cost", click.FloatRange(min=0, min_open=True), "Stop issuing requests before spending more USD."),
            ("--strict-inputs/--no-strict-inputs", bool, "Stop before sending if any media file is missing or bad."),
            ("--executor", click.Choice(["local", "ray"]), "Send from this process or from a Ray cluster."),
            ("--ray-address", str, "Ray cluster to join (executor.address), e.g. ray://head:10001 or auto."),
            ("--workers", click.IntRange(min=1), "Ray shards, split by request hash (executor.workers)."),
        ]
    ):
        fn = click.option(flag, type=kind, default=None, help=text)(fn)
    return fn


class _OneLineErrors(click.Group):
    """A wrong flag is a user mistake like any other: one line on stderr and exit 2, not click's usage block."""

    def main(  # type: ignore[override]
        self, args: Sequence[str] | None = None, prog_name: str | None = None, standalone_mode: bool = True, **kw: Any
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, standalone_mode=False, **kw)
        try:
            code = super().main(args, prog_name, standalone_mode=False, **kw)
        except click.exceptions.NoArgsIsHelpError as exc:  # `seedbatch` alone: the help is the answer
            click.echo(exc.format_message())
            sys.exit(0)
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            _say_error("error", exc.format_message() + hint, EXIT_USAGE, "text")
            sys.exit(EXIT_USAGE)
        except click.exceptions.Abort:
            click.echo("seedbatch: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="seedbatch")
def main() -> None:
    """Run LLM chat-completion jobs over tables: rate-limited, resumable, typed Parquet out."""


@main.command()
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
    from pipeline.cli.reports import summary_fields, up_to_date_fields
    from pipeline.state.decision import UpToDate, decide

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr)
    # httpx logs one INFO line per request: noise at 10k rows, and its transport's debug lines can
    # echo request details. Our own progress and summary lines say what matters.
    for name in ("httpx", "httpcore", "aiohttp"):
        logging.getLogger(name).setLevel(logging.WARNING)
    spec = _spec(job, **overrides)
    if spec.evaluation is not None:  # a gold column or file that is not there stops the run before it pays
        from pipeline.quality.gold import check

        check(spec)
    if fresh and not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("--fresh re-pays every row; add --yes to confirm when not at a terminal")
        click.confirm(f"--fresh ignores {spec.ledger_path} and pays for every row again. Continue?", abort=True)
    selection = _selection(limit, sample, sample_seed)
    from pipeline.job.stages import uses_stages

    stages = uses_stages(spec.votes, spec.escalation)  # its output is rebuilt from its stages' own runs
    # Decided once, before polars loads: only a run with work to do pays for the imports.
    decision = None if stages else decide(spec, selection, fresh=fresh, retry_errors=retry_errors)
    if isinstance(decision, UpToDate):
        Reporter(live=False, log_format=log_format).log("up_to_date", up_to_date_fields(decision.summary))
        sys.exit(decision.summary.exit_code)
    from pipeline.runner import RunOptions, run_job

    live = sys.stderr.isatty() if progress is None else progress
    with Reporter(live=live and log_format == "text", log_format=log_format) as reporter:
        options = RunOptions(
            selection=selection,
            retry_errors=retry_errors,
            fresh=fresh,
            progress=reporter if (live or progress is None or progress) else None,
            progress_interval_s=0.25 if live else progress_interval,
            log=lambda message: reporter.log("notice", {"message": message}),
        )
        with stop_on_signals(options.stop):
            if stages:
                from pipeline.quality.voting import run_stages

                summary = run_stages(spec, options)
            else:
                summary = run_job(spec, options, decision)
    fields = summary_fields(summary)
    reporter.log("summary", fields)
    for kind, n in sorted(summary.errors_by_kind.items()):
        reporter.log("errors", {"kind": kind, "count": n, "example": summary.error_examples.get(kind, "")})
    if summary.stop_reason:
        reporter.log("stopped", {"reason": summary.stop_reason})
    if spec.evaluation is not None:
        from pipeline.quality.evaluate import after_run

        after_run(spec, reporter.log, log_format == "json")
    sys.exit(summary.exit_code)


@main.command()
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

    spec = _spec(job, **overrides)
    p = plan_job(spec, _selection(limit, sample, sample_seed), retry_errors=retry_errors)
    for line in plan_lines(spec, job, p):
        click.echo(line)
    from pipeline.job.stages import uses_stages

    if uses_stages(spec.votes, spec.escalation):
        from pipeline.planning import plan_stages, stages_lines

        for line in stages_lines(plan_stages(spec, _selection(limit, sample, sample_seed), retry_errors=retry_errors)):
            click.echo(line)


@main.command()
@job_arg
@override_opts
@selection_opts
@debug_opt
@guarded
def status(job: str, limit: int | None, sample: int | None, sample_seed: int, debug: bool, **overrides: Any) -> None:
    """Rows done / failed / pending for JOB, from the ledger and the input. Sends nothing."""
    from pipeline.cli.reports import status_lines
    from pipeline.planning import job_status

    spec = _spec(job, **overrides)
    s = job_status(spec, _selection(limit, sample, sample_seed))
    for line in status_lines(spec, job, s):
        click.echo(line)


@main.command()
@click.argument("output")
@click.option("--rows", "n", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--status", "only_status", default=None, help="Only rows with this status.")
@click.option("--width", type=int, default=100, show_default=True, help="Truncate values to this many characters.")
@debug_opt
@guarded
def show(output: str, n: int, only_status: str | None, width: int, debug: bool) -> None:
    """Print a few rows of an OUTPUT file (.parquet, .csv, .jsonl; a path or s3://bucket/key) readably."""
    import tempfile

    from pipeline.errors import InputError
    from pipeline.job.spec import expand_home, is_object_uri
    from pipeline.tables.output_tables import read_output

    output = expand_home(output)
    with tempfile.TemporaryDirectory(prefix="seedbatch-show-") as tmp:
        if is_object_uri(output):
            from pipeline.tables import storage

            path = storage.download(output, Path(tmp) / Path(output.split("?", 1)[0]).name, what="the OUTPUT argument")
        else:
            path = Path(output)
            if not path.exists():
                raise InputError(f"{output}: no such output file (run the job first)")
        df, counts = read_output(path, only_status, n)
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


@main.command()
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


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8765, show_default=True)
@click.option("--latency-ms", type=float, default=0.0, show_default=True)
@click.option("--jitter-ms", type=float, default=0.0, show_default=True)
@click.option("--rpm", type=float, default=None, help="Server-side request limit (429 beyond it).")
@click.option("--tpm", type=float, default=None, help="Server-side token limit.")
@click.option("--fail-5xx", type=float, default=0.0, help="Fraction answered 5xx.")
@click.option("--drop", type=float, default=0.0, help="Fraction of connections dropped.")
@click.option("--hang", type=float, default=0.0, help="Fraction hung (never answered unless --hang-s).")
@click.option("--hang-s", type=float, default=None, help="Seconds a hung request waits, then answers (default: never).")
@click.option("--invalid-json", type=float, default=0.0, help="Fraction of JSON answers broken or off-schema.")
@click.option(
    "--invalid-arguments", type=float, default=0.0, help="Fraction of function calls with malformed arguments."
)
@click.option("--require-key-env", default=None, help="Demand the key held by this environment variable.")
@click.option("--revoke-key-after", type=int, default=None, help="After N answers every request gets 401.")
@click.option("--fail-status", type=int, default=None, help="Answer every request with this status (e.g. 503).")
@click.option(
    "--fail-body",
    default="json",
    show_default=True,
    help="What --fail-status answers say: json, html (a login page), no_choices, or a message of your own.",
)
@click.option("--fail-for-s", type=float, default=None, help="The failing ends after this many seconds.")
@click.option("--no-ratelimit-headers", is_flag=True, help="Send no x-ratelimit-* headers.")
@click.option("--no-retry-after", is_flag=True, help="429s carry no Retry-After.")
@click.option("--advertised-rpm", type=float, default=None, help="Headers claim this RPM, not the one enforced.")
@click.option("--burst-s", type=float, default=1.0, show_default=True, help="Window over which --rpm/--tpm hold.")
@click.option(
    "--model",
    "models",
    multiple=True,
    help="Also serve this model id (repeatable); any model not served is a 404 model_not_found.",
)
@click.option(
    "--error-rate",
    "error_rates",
    multiple=True,
    metavar="FIELD=RATE",
    help="Answer FIELD wrong in this share of answers (repeatable; 'text' for text answers). See README.",
)
@debug_opt
@guarded
def serve(
    host: str,
    port: int,
    latency_ms: float,
    jitter_ms: float,
    rpm: float | None,
    tpm: float | None,
    fail_5xx: float,
    drop: float,
    hang: float,
    hang_s: float | None,
    invalid_json: float,
    invalid_arguments: float,
    require_key_env: str | None,
    revoke_key_after: int | None,
    fail_status: int | None,
    fail_body: str,
    fail_for_s: float | None,
    no_ratelimit_headers: bool,
    no_retry_after: bool,
    advertised_rpm: float | None,
    burst_s: float,
    models: tuple[str, ...],
    error_rates: tuple[str, ...],
    debug: bool,
) -> None:
    """Run the built-in local API (OpenAI/AIML-compatible) for dry runs, tests and benchmarks."""

    from pipeline.errors import SpecError
    from pipeline.localapi import KNOWN_MODELS, ServerConfig, run_server
    from pipeline.localapi.truth import parse_error_rates

    if require_key_env and not os.environ.get(require_key_env):
        raise SpecError(f"--require-key-env {require_key_env}: that environment variable is not set")
    config = ServerConfig(
        latency_ms=latency_ms,
        latency_jitter_ms=jitter_ms,
        rpm=rpm,
        tpm=tpm,
        fail_5xx_rate=fail_5xx,
        drop_rate=drop,
        hang_rate=hang,
        hang_s=hang_s,
        invalid_json_rate=invalid_json,
        invalid_arguments_rate=invalid_arguments,
        require_key=os.environ.get(require_key_env) if require_key_env else None,
        revoke_key_after=revoke_key_after,
        fail_status=fail_status,
        fail_body=fail_body,
        fail_for_s=fail_for_s,
        ratelimit_headers=not no_ratelimit_headers,
        retry_after=not no_retry_after,
        advertised_rpm=advertised_rpm,
        burst_s=burst_s,
        models=tuple(dict.fromkeys((*KNOWN_MODELS, *models))),
        field_error_rates=parse_error_rates(error_rates),
    )
    run_server(config, host, port, ready=lambda url: click.echo(f"seedbatch local API on {url}", err=True))


def entry() -> None:
    """The ``seedbatch`` process (console script and ``python -m pipeline``): the CLI, then a clean exit.

    Everything a run writes is durable before the command returns (ledger committed and closed, output
    and manifest moved into place), so the process leaves with ``os._exit`` after flushing its streams
    instead of running the interpreter's teardown: with pyarrow's CSV reader loaded, that teardown
    aborted with "terminate called without an active exception" (SIGABRT, exit -6) in 12 of 40 exits
    on a loaded 2-core machine, turning a clean exit 2 into a crash. Tests call ``main`` in-process.
    """
    code = 1
    # httpx's own command-line tool (httpx._main) loads rich's syntax highlighting and pygments when
    # httpx is imported: 6 MB and ~50 ms of every seedbatch process, for a tool seedbatch never calls.
    # A None entry makes that one import fail, which httpx handles by defining a stub ``httpx.main``.
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    # Start-up imports ~1M long-lived objects (polars, pydantic, httpx); with the default thresholds the
    # cyclic GC ran 132 times over them, 52 ms of a 10-row job's ~0.5 s. A young generation of 50,000
    # objects (as long-lived servers set it) keeps that to one collection; garbage still goes.
    gc.set_threshold(50_000, 20, 20)
    try:
        main.main(standalone_mode=True)
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, str):
            click.echo(exc.code, err=True)
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except KeyboardInterrupt:
        code = 130
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(code)


@main.command("eval")
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
