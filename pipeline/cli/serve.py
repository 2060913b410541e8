"""``seedbatch serve``: the built-in local API (OpenAI/AIML-compatible), with the limits and faults asked for."""

from __future__ import annotations

import os

import click

from pipeline.cli.common import debug_opt, guarded


@click.command()
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
