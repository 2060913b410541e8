"""The ``seedbatch`` command: parse, call the library, print, map errors to exit codes. No logic.

One module per command family: ``run``, ``inspect`` (plan, status, show), ``init``, ``serve``,
``evaluate`` (eval); ``common`` holds what they share, ``reports`` and ``progress`` what they print.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys

import click

from pipeline import __version__
from pipeline.cli import evaluate, init, inspect, run, serve
from pipeline.cli.common import OneLineErrors


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="seedbatch")
def main() -> None:
    """Run LLM chat-completion jobs over tables: rate-limited, resumable, typed Parquet out."""


for command in (run.run, inspect.plan, inspect.status, inspect.show, init.init, serve.serve, evaluate.evaluate):
    main.add_command(command)


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
    # httpx is imported: memory and start-up time in every seedbatch process, for a tool it never calls.
    # A None entry makes that one import fail, which httpx handles by defining a stub ``httpx.main``.
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    # Start-up imports ~1M long-lived objects (polars, pydantic, httpx); with the default thresholds the
    # cyclic GC walks them again and again, a visible share of a small job's wall time. A young generation
    # of 50,000 objects (as long-lived servers set it) keeps that to one collection; garbage still goes.
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
