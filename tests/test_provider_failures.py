"""Failure that is not random, played by the local API and met as a user meets it.

A key revoked mid-run, a provider that is down (and one that comes back), a gateway's login page, a
200 that is not a completion, nothing listening, the same refusal for every row, TLS spoken to a
plain-HTTP server. Each case asserts what the user sees (exit code, the one line on stderr, no
traceback), what was sent, and what was kept: every answer the server returned with 200 is in the
ledger, and a rerun pays for none of them again.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.localapi import LocalAPI, ServerConfig
from pipeline.records import ExitCode
from pipeline.state.ledger import Ledger
from tests.helpers import finish, make_spec, reviews, run, write_job

NO_TRACEBACK = ("Traceback", "Task exception was never retrieved", "Error handling request")


def _ok_in_ledger(spec: Any) -> int:
    ledger = Ledger(spec.ledger_path, spec.endpoint_key)
    try:
        return int(ledger.db.execute("SELECT count(*) FROM answers WHERE status = 'ok'").fetchone()[0])
    finally:
        ledger.close()


def _clean(stderr: bytes) -> str:
    text = stderr.decode()
    for mark in NO_TRACEBACK:
        assert mark not in text, text
    return text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("answers_before_revoke", [20, 500])
def test_a_key_revoked_mid_run_keeps_every_paid_answer_and_the_rerun_pays_none_twice(
    tmp_path: Path, answers_before_revoke: int
) -> None:
    for attempt in range(3):
        with LocalAPI(ServerConfig(revoke_key_after=answers_before_revoke)) as api:
            spec = make_spec(tmp_path / str(attempt), api, n=600, limits={"concurrency": 4096})
            summary = run(spec)
            stats = api.stats()
            assert summary.exit_code == ExitCode.FATAL_API
            assert "API key was rejected" in (summary.stop_reason or "")
            assert stats["answered_ok"] == answers_before_revoke
            assert _ok_in_ledger(spec) == answers_before_revoke  # every 200 the server sent is kept
            assert summary.requests_sent == stats["received"]  # the summary counts what the server received
            assert summary.rows_by_status.get("pending") == 600 - answers_before_revoke
            api.config.revoke_key_after = None  # the key is fixed
            rerun = run(spec)
            assert rerun.exit_code == 0
            assert api.stats()["duplicates"] == 0  # nothing paid twice
            assert rerun.rows_from_ledger == answers_before_revoke


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ({"fail_status": 500}, "HTTP 500: The local API is failing every request"),
        ({"fail_status": 200, "fail_body": "html"}, '200 with a body that is not JSON (text/html: "<!DOCTYPE html>'),
        ({"fail_status": 200, "fail_body": "no_choices"}, "200 without choices"),
    ],
)
def test_a_provider_that_fails_every_request_is_probed_not_hammered_then_given_up_on(
    tmp_path: Path, fault: dict[str, Any], words: str
) -> None:
    with LocalAPI(ServerConfig(**fault)) as api:
        job = write_job(tmp_path, api, reviews(300), limits={"outage_wait_s": 3.5, "concurrency": 4096})
        done = finish(job, timeout=120)
        stderr = _clean(done.stderr)
        received = api.stats()["received"]
    assert done.returncode == ExitCode.UNAVAILABLE, stderr
    # The circuit opened after a handful of failures; then one probe at 1 s, 2 s (3.5 s allowed).
    assert received <= 12, received
    stopped = [line for line in stderr.splitlines() if line.startswith("seedbatch stopped")]
    assert len(stopped) == 1 and "the provider is unavailable" in stopped[0] and words in stopped[0], stderr
    assert "rows_pending=300" in stderr  # no row used up its attempts or ended as an error
    assert pl.read_parquet(tmp_path / "out" / "result.parquet")["status"].unique().to_list() == ["pending"]


def test_nothing_listening_is_named_as_refused_and_given_up_on(tmp_path: Path) -> None:
    port = _free_port()
    job = write_job(
        tmp_path,
        None,
        reviews(50),
        endpoint={"preset": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "api_key_env": "NO_KEY_NEEDED"},
        limits={"outage_wait_s": 2.5},
    )
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(job), "--no-progress"],
        capture_output=True,
        timeout=120,
        check=False,
        env={**os.environ, "NO_KEY_NEEDED": "k"},
    )
    stderr = _clean(done.stderr)
    assert done.returncode == ExitCode.UNAVAILABLE, stderr
    assert f"connection refused at 127.0.0.1:{port}" in stderr, stderr
    assert "requests_sent=0" in stderr  # a refused connection never reached a server


def test_an_outage_that_ends_recovers_in_the_same_run_and_pays_nothing_twice(tmp_path: Path) -> None:
    with LocalAPI(ServerConfig(fail_status=503, fail_for_s=3.0)) as api:
        spec = make_spec(tmp_path, api, n=300, limits={"concurrency": 4096})
        summary = run(spec)
        stats = api.stats()
    assert summary.exit_code == 0, summary.stop_reason
    assert summary.rows_by_status == {"ok": 300}
    assert stats["duplicates"] == 0
    # While it was down: a handful of failures opened the circuit, then one probe a step.
    assert stats["by_status"].get(503, 0) <= 12, stats["by_status"]


def test_an_outage_with_outage_wait_zero_stops_at_the_first_storm(tmp_path: Path) -> None:
    with LocalAPI(ServerConfig(fail_status=502)) as api:
        spec = make_spec(tmp_path, api, n=100, limits={"outage_wait_s": 0})
        summary = run(spec)
        received = api.stats()["received"]
    assert summary.exit_code == ExitCode.UNAVAILABLE
    assert received <= 8
    assert summary.rows_by_status == {"pending": 100}


@pytest.mark.parametrize(
    ("config", "model", "quoted"),
    [
        ({"fail_status": 400, "fail_body": "No connected db."}, None, "HTTP 400: No connected db."),
        ({"fail_status": 400, "fail_body": "Invalid model name passed in model=gpt-x"}, None, "Invalid model name"),
    ],
)
def test_the_same_refusal_for_every_row_is_a_setup_error_after_a_few_requests(
    tmp_path: Path, config: dict[str, Any], model: str | None, quoted: str
) -> None:
    with LocalAPI(ServerConfig(**config)) as api:
        job = write_job(tmp_path, api, reviews(300))
        done = finish(job, timeout=120)
        stderr = _clean(done.stderr)
        received = api.stats()["received"]
    assert done.returncode == ExitCode.FATAL_API, stderr
    assert received <= 5, received
    assert quoted in stderr and "every row gets the same refusal" in stderr
    assert "rows_pending=300" in stderr  # not 300 final errors: a rerun after the fix sends them


def test_a_refusal_about_the_row_is_the_rows_error_not_a_setup_error(tmp_path: Path) -> None:
    frame = reviews(20).with_columns(
        pl.when(pl.int_range(pl.len()) < 5)
        .then(pl.col("text") + " [[status:413]]")
        .otherwise(pl.col("text"))
        .alias("text")
    )
    with LocalAPI(ServerConfig()) as api:
        summary = run(make_spec(tmp_path, api, frame))
    assert summary.exit_code == ExitCode.ROWS_FAILED
    assert summary.rows_by_status == {"ok": 15, "error": 5}


def test_a_wrong_key_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    with LocalAPI(ServerConfig(require_key="right")) as api:
        job = write_job(tmp_path, api, reviews(300))
        done = finish(job, timeout=120)
        stderr = _clean(done.stderr)
        received = api.stats()["received"]
    assert done.returncode == ExitCode.FATAL_API
    assert received <= 5, received  # narrow until the server's first 200
    assert len(stderr.strip().splitlines()) <= 3, stderr  # the summary and the reason it stopped


def test_tls_spoken_to_a_plain_http_server_says_so_and_stops_at_once(tmp_path: Path) -> None:
    with LocalAPI(ServerConfig()) as api:
        url = api.base_url.replace("http://", "https://")
        job = write_job(
            tmp_path, None, reviews(30), endpoint={"preset": "openai", "base_url": url, "api_key_env": "HOME"}
        )
        done = finish(job, timeout=120)
    stderr = _clean(done.stderr)
    assert done.returncode == ExitCode.FATAL_API, stderr
    assert "speaks plain HTTP, not TLS: use http://" in stderr, stderr


def test_a_job_limit_four_times_the_servers_draws_few_refusals(tmp_path: Path) -> None:
    # Narrow until the first 200, whose headers carry the server's limit: the opening burst fits it.
    with LocalAPI(ServerConfig(rpm=3000)) as api:
        summary = run(make_spec(tmp_path, api, n=200, limits={"rpm": 12_000, "concurrency": 4096}))
    assert summary.rows_by_status == {"ok": 200}
    assert summary.http_429 <= 0.02 * summary.requests_sent, summary.http_429


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_a_cluster_address_nothing_answers_on_fails_in_one_line_before_ray_is_asked(address: str) -> None:
    from pipeline.errors import SpecError
    from pipeline.executors.ray import check_reachable

    given = address.format(port=_free_port())
    with pytest.raises(SpecError) as raised:
        check_reachable(given)
    assert str(raised.value) == (
        f"executor.address {given!r}: no Ray cluster answers there (connection refused within 10 s); "
        "check the address (--ray-address) or start one with `ray start --head`"
    )
