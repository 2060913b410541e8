"""The Ray executor: sharded runs equal local runs, one RPM for the cluster, a killed worker pays nothing twice.

Tests marked ``ray`` start a local Ray instance once per module (``make test-ray``); the others check
what needs no Ray (the missing-Ray error, merging shard ledgers a dead driver left behind) and run in
the default tier.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner

from pipeline.errors import SpecError
from pipeline.localapi import LocalAPI, ServerConfig
from pipeline.records import Outcome, Usage
from pipeline.runner import ExitCode, RunSummary
from tests.helpers import TIMING, Poller, example_job, make_spec, reviews, run, write_job

RATE_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def on_ray(workers: int = 2) -> dict[str, Any]:
    return {"kind": "ray", "workers": workers}


# ------------------------------------------------------------------------------------------ no Ray needed


def test_missing_ray_is_a_one_line_spec_error(tmp_path: Path, api: LocalAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    spec = make_spec(tmp_path, api, reviews(3), executor={"kind": "ray"})
    with pytest.raises(SpecError, match=r"pip install 'seedbatch\[ray\]'"):
        run(spec)
    assert api.stats()["received"] == 0
    assert not spec.ledger_path.exists(), "nothing is touched before the check"

    (tmp_path / "cli").mkdir()
    job = write_job(tmp_path / "cli", api, reviews(3))
    result = CliRunner().invoke(main, ["run", str(job), "--executor", "ray", "--no-progress"])
    assert result.exit_code == 2
    assert "pip install 'seedbatch[ray]'" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_answers_left_in_shard_ledgers_are_merged_by_the_next_run(tmp_path: Path, api: LocalAPI) -> None:
    """A Ray driver that died before merging: the next run (here a local one) pays none of those rows again."""
    from pipeline.executors.ray import shard_path
    from pipeline.ledger import ShardLedger

    frame = reviews(10)
    spec = make_spec(tmp_path, api, frame)
    assert run(spec).exit_code == ExitCode.OK
    paid = pl.read_parquet(spec.job.output)
    spec.ledger_path.unlink()  # only the shard ledgers below know the answers now
    spec.shards_dir.mkdir()
    for k, part in enumerate((paid.head(6), paid.tail(4))):
        shard = ShardLedger(shard_path(spec.shards_dir, k), spec.ledger_path, spec.endpoint_key)
        for r in part.iter_rows(named=True):
            outcome = Outcome(r["request_hash"], "ok", r["content"], usage=Usage(prompt_tokens=r["prompt_tokens"]))
            shard.add(outcome, "dead-run")
        shard.close()
    api.reset()
    summary = run(spec)
    assert api.stats()["received"] == 0
    assert summary.rows_from_ledger == 10
    assert not spec.shards_dir.exists()
    assert pl.read_parquet(spec.job.output).get_column("content").to_list() == paid.get_column("content").to_list()


# ------------------------------------------------------------------------------------------ on a local Ray


@pytest.mark.ray
def test_sharded_output_equals_local_output(tmp_path: Path, api: LocalAPI, ray_local: Any) -> None:
    local = example_job("label_reviews.toml", tmp_path / "local", api)
    assert run(local).exit_code == ExitCode.OK
    api.reset()
    sharded = example_job("label_reviews.toml", tmp_path / "ray", api, executor=on_ray(3))
    summary: RunSummary = run(sharded)
    assert summary.exit_code == ExitCode.OK, summary.stop_reason
    expected = pl.read_parquet(local.job.output)
    got = pl.read_parquet(sharded.job.output)
    keep = [c for c in expected.columns if c not in TIMING]
    assert got.columns == expected.columns
    assert got.select(keep).equals(expected.select(keep))
    # Identical requests are sent once per shard holding them (dedupe is per shard): the job has two
    # word-for-word duplicate reviews; those whose copies fall in different row ranges are paid twice.
    from pipeline.executors.ray import split_rows

    shard_of = {}
    for k, rng in enumerate(split_rows(expected.height, 3)):
        for h in expected.get_column("request_hash").to_list()[rng.start : rng.stop]:
            shard_of.setdefault(h, set()).add(k)
    cross_shard = sum(len(shards) - 1 for shards in shard_of.values())
    stats = api.stats()
    assert stats["duplicates"] == cross_shard
    assert stats["answered_ok"] == summary.requests_sent == expected.filter(pl.col("attempts") > 0).height + cross_shard
    assert not sharded.shards_dir.exists(), "shard ledgers are merged and removed"

    api.reset()
    again = run(sharded)
    assert api.stats()["received"] == 0, "a finished sharded job sends nothing"
    assert again.rows_from_ledger == expected.height


@pytest.mark.ray
def test_cluster_wide_rpm_holds(tmp_path: Path, api: LocalAPI, ray_local: Any) -> None:
    rows, rpm = 300, 1200.0
    api.config = ServerConfig(latency_ms=50)
    spec = make_spec(tmp_path, api, reviews(rows), limits={"rpm": rpm, "concurrency": 16}, executor=on_ray(2))
    with Poller(api) as poller:
        summary = run(spec)
    assert summary.exit_code == ExitCode.OK, summary.stop_reason
    measured, window = poller.rpm(rows)
    ratio = measured / rpm
    print(f"\ncluster rpm: {measured:,.0f}/min over {window:.1f} s with 2 Ray workers = {ratio:.3f} x limit")
    assert abs(ratio - 1.0) <= RATE_TOLERANCE
    assert api.stats()["duplicates"] == 0


@pytest.mark.ray
def test_killed_worker_resumes_from_its_shard_ledger(tmp_path: Path, api: LocalAPI, ray_local: Any) -> None:
    rows, concurrency = 400, 8
    api.config = ServerConfig(latency_ms=200)
    spec = make_spec(tmp_path, api, reviews(rows), limits={"concurrency": concurrency}, executor=on_ray(2))
    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.update(summary=run(spec)))
    thread.start()
    pid_file = spec.shards_dir.resolve() / "0000.pid"
    deadline = time.monotonic() + 60
    while (not pid_file.exists() or api.stats()["answered_ok"] < 60) and time.monotonic() < deadline:
        time.sleep(0.02)
    victim = int(pid_file.read_text())
    answered_at_kill = int(api.stats()["answered_ok"])
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=120)
    assert not thread.is_alive()
    summary: RunSummary = box["summary"]
    out = pl.read_parquet(spec.job.output)
    stats = api.stats()
    print(
        f"\nworker kill: pid {victim} SIGKILLed at {answered_at_kill} answered; "
        f"{out.height} rows, {out.filter(pl.col('status') == 'ok').height} ok, "
        f"{stats['duplicates']} answered twice (in flight per shard: {concurrency})"
    )
    assert summary.exit_code == ExitCode.OK, summary.stop_reason
    assert out.height == rows
    assert out.get_column("status").unique().to_list() == ["ok"]
    assert not spec.shards_dir.exists(), "shard ledgers are merged and removed"
    # Paid twice: at most what was in flight plus one flush interval of answers in the killed shard.
    assert stats["duplicates"] <= 2 * concurrency
    assert stats["answered_ok"] - stats["duplicates"] == rows
