"""What every ``seedbatch`` command shares: errors as one line and an exit code, the job and row flags,
signals that stop a run.

Only ``click`` and light modules are imported here: each command imports the library it calls when it
runs, so ``seedbatch --help`` and a run with nothing to do load no table or HTTP library.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from pipeline.errors import SeedbatchError
from pipeline.options import StopToken
from pipeline.records import ExitCode, Selection

if TYPE_CHECKING:
    from pipeline.job.spec import JobSpec

EXIT_USAGE = ExitCode.BAD_INPUT
EXIT_INTERNAL = ExitCode.INTERNAL


def say_error(kind: str, message: str, exit_code: int, log_format: str) -> None:
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
        say_error("error", str(exc), exc.exit_code, log_format)
        sys.exit(exc.exit_code)
    if isinstance(exc, click.ClickException):  # a wrong flag: the user's to fix, not a bug
        say_error("error", exc.format_message(), EXIT_USAGE, log_format)
        sys.exit(EXIT_USAGE)
    say_error(
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


def load_job(job: str, **overrides: Any) -> JobSpec:
    """The job file with the command line's overrides applied (``load_spec`` checks both)."""
    from pipeline.job.spec import load_spec

    return load_spec(job, overrides)


def selection(limit: int | None, sample: int | None, seed: int) -> Selection:
    """The rows ``--limit`` / ``--sample`` pick; the two together are a usage error."""
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
    """``--limit``, ``--sample`` and ``--sample-seed``: which rows of the input a command looks at."""
    fn = click.option("--limit", type=click.IntRange(min=1), help="Only the first N rows.")(fn)
    fn = click.option("--sample", type=click.IntRange(min=1), help="N random rows (fixed seed).")(fn)
    fn = click.option("--sample-seed", type=int, default=0, show_default=True, help="Seed for --sample.")(fn)
    return fn


def override_opts(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The flags that override a job file's settings; each arrives as a keyword for ``load_job``."""
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


class OneLineErrors(click.Group):
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
            say_error("error", exc.format_message() + hint, EXIT_USAGE, "text")
            sys.exit(EXIT_USAGE)
        except click.exceptions.Abort:
            click.echo("seedbatch: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)
