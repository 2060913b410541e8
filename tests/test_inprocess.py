"""``preset = "local"`` without a base_url: the local API answers in the run's own process.

The HTTP behaviour of the local API is tested over real sockets elsewhere (``test_localapi``); here:
the in-process transport gives the same answers, carries its faults as a socket would (a drop is a
``RemoteProtocolError``, a hang is cut by the client's deadline, a stalled stream is re-sent), and a
small job's process loads neither aiohttp nor pyarrow (the start-up budget of issue 14's S7).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import httpx
import polars as pl
import pytest

from pipeline.job.spec import JobSpec, spec_from_dict
from pipeline.localapi import LocalAPI, ServerConfig
from pipeline.localapi.inprocess import BASE_URL, InProcessTransport
from pipeline.runner import RunOptions, run_job
from tests.helpers import ROOT, job_dict, reviews

#: Columns that differ between two runs by nature (ids are random, latency is measured).
_VARYING = ("response_id", "latency_ms")


def _spec(tmp_path: Path, name: str, rows: int, base_url: str | None = None, **sections: dict[str, object]) -> JobSpec:
    data = tmp_path / "reviews.parquet"
    if not data.exists():
        reviews(rows).write_parquet(data)
    return spec_from_dict(job_dict(data, tmp_path / f"{name}.parquet", base_url, **sections), base_dir=tmp_path)


def test_in_process_answers_equal_the_served_ones(tmp_path: Path) -> None:
    local = run_job(_spec(tmp_path, "inprocess", 25), RunOptions())
    with LocalAPI() as api:
        served = run_job(_spec(tmp_path, "served", 25, api.base_url), RunOptions())
        assert api.stats()["answered_ok"] == 25
    assert local.rows_by_status == served.rows_by_status == {"ok": 25}
    a = pl.read_parquet(tmp_path / "inprocess.parquet").drop(_VARYING)
    b = pl.read_parquet(tmp_path / "served.parquet").drop(_VARYING)
    assert a.equals(b)


def test_faults_in_process_are_retried_like_socket_ones(tmp_path: Path) -> None:
    """Drops, 5xx and finite hangs on the in-process API: every row ends ok, each fault cost a retry."""
    transport = InProcessTransport(ServerConfig(drop_rate=0.15, fail_5xx_rate=0.1, hang_rate=0.05, hang_s=30, seed=7))
    spec = _spec(tmp_path, "faults", 60, limits={"max_attempts": 10, "request_timeout_s": 1.0, "backoff_max_s": 0.05})
    summary = run_job(spec, RunOptions(transport=transport))
    stats = transport.handler.snapshot()
    assert summary.rows_by_status == {"ok": 60}
    assert stats["dropped"] > 0 and stats["hung"] > 0
    faults = stats["dropped"] + stats["hung"] + sum(n for code, n in stats["by_status"].items() if code >= 500)
    assert summary.retries == faults
    assert stats["answered_ok"] == 60  # a fault never answered: nothing was paid twice


def test_stalled_stream_in_process_is_dropped_and_sent_again(tmp_path: Path) -> None:
    transport = InProcessTransport(ServerConfig(hang_rate=0.25, hang_s=None, seed=3))
    spec = _spec(tmp_path, "stream", 40, endpoint={"stream": True, "stall_s": 0.3}, limits={"max_attempts": 10})
    summary = run_job(spec, RunOptions(transport=transport))
    assert summary.rows_by_status == {"ok": 40}
    hung = transport.handler.snapshot()["hung"]
    assert hung >= 4, "too few stalls to prove anything"
    assert summary.errors_by_kind.get("stall", 0) >= hung


def test_the_built_in_api_serves_the_jobs_model(tmp_path: Path) -> None:
    """It stands in for the job's own server: ``--endpoint local`` on a job written for OpenAI runs."""
    summary = run_job(_spec(tmp_path, "openai_job", 3, model={"name": "gpt-4o-mini"}), RunOptions())
    assert summary.rows_by_status == {"ok": 3}


def test_transport_routes_models_and_refuses_unknown_paths() -> None:
    async def calls() -> tuple[httpx.Response, ...]:
        transport = InProcessTransport(ServerConfig(require_key="k"))
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as c:
            return (
                await c.get("/models"),
                await c.get("/models", headers={"Authorization": "Bearer k"}),
                await c.get("/nowhere"),
                await c.get("/models/bytedance/dola-seed-2-0-lite", headers={"Authorization": "Bearer k"}),
                await c.get("/models/gpt-4o-mimi", headers={"Authorization": "Bearer k"}),
            )

    denied, models, missing, model, unknown = asyncio.run(calls())
    assert model.json()["id"] == "bytedance/dola-seed-2-0-lite"
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "model_not_found")
    assert denied.status_code == 401
    assert denied.json()["error"]["code"] == "invalid_api_key"
    assert models.status_code == 200
    assert models.json()["data"][0]["object"] == "model"
    assert missing.status_code == 404


@pytest.mark.parametrize("served", [False, True], ids=["in-process", "against-a-server"])
def test_a_small_job_loads_neither_aiohttp_nor_pyarrow(tmp_path: Path, served: bool) -> None:
    """What keeps a 10-row job at ~0.4 s and under 100 MB: no aiohttp (the in-process API, or httpx's
    own pool for a job of few rows against a server), no pyarrow/numpy (polars reads and writes one
    chunk), no httpx command-line tool. Read from ``-X importtime`` of the real command (the process
    ends with ``os._exit``, so it cannot be asked afterwards)."""
    data = tmp_path / "reviews.parquet"
    reviews(10).write_parquet(data)
    job = tmp_path / "job.toml"
    job.write_text(
        f'[job]\ninput = "{data}"\noutput = "{tmp_path / "out.parquet"}"\n'
        '[prompt]\nuser = "{text}"\n[endpoint]\npreset = "local"\n'
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with contextlib.ExitStack() as stack:
        extra = ["--base-url", stack.enter_context(LocalAPI()).base_url] if served else []
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "pipeline", "run", str(job), "--no-progress", *extra],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "polars" in loaded and "httpx" in loaded  # the reading of the log is right
    heavy = {"aiohttp", "pyarrow", "numpy", "rich", "pygments"}
    assert loaded.isdisjoint(heavy), sorted(loaded & heavy)
    assert pl.read_parquet(tmp_path / "out.parquet").get_column("status").to_list() == ["ok"] * 10
