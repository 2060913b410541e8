"""One key, one limit: jobs naming the same ``limits.shared_limiter`` keep its RPM together."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import polars as pl
import pytest

from pipeline.errors import SpecError
from pipeline.localapi import LocalAPI, ServerConfig
from pipeline.runner import ExitCode
from pipeline.sending.shared_limits import ReservationBucket, SqliteQuota, reserve
from tests.fake_time import FakeTime
from tests.helpers import Poller, make_spec, reviews, start, write_job


def test_reservations_hold_the_rate_and_reach_no_further_than_the_horizon() -> None:
    bucket, rate = ReservationBucket(1.0), 10.0
    now, sent, waits = 0.0, [], []
    while len(sent) < 100:
        ok, wait = reserve([(bucket, rate, 1.0)], now, horizon_s=0.5)
        if ok:
            sent.append(now + wait)
            waits.append(wait)
        else:
            assert wait > 0
            now += wait
    assert sent[0] == pytest.approx(0.1), "the bucket starts empty: no opening burst"
    assert (len(sent) - 1) / (sent[-1] - sent[0]) == pytest.approx(rate, rel=1e-6)
    assert max(waits) <= 0.5 + 1e-9


def test_two_quotas_on_one_file_share_the_rate(tmp_path: Path) -> None:
    rpm, n = 1200.0, 40  # 20/s: two takers of 40 each need ~4 s together, 2 s each alone

    t = FakeTime()
    t.now = 1_000.0

    async def main() -> float:
        quotas = [SqliteQuota("k", tmp_path / "limits.sqlite", rpm, None, clock=t, sleep=t.sleep) for _ in range(2)]
        t0 = t.now
        await asyncio.gather(*(q.take(0) for q in quotas for _ in range(n)))
        for q in quotas:
            q.close()
        return t.now - t0

    took = asyncio.run(main())
    assert took == pytest.approx((2 * n) / (rpm / 60), rel=0.1)


def test_shared_limiter_needs_a_limit_and_is_not_for_ray(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="set at least one"):
        make_spec(tmp_path, None, reviews(2), limits={"shared_limiter": "key"})
    with pytest.raises(SpecError, match="Ray run already holds one limit"):
        make_spec(tmp_path, None, reviews(2), limits={"shared_limiter": "key", "rpm": 60}, executor={"kind": "ray"})


def test_two_jobs_in_two_processes_hold_one_rpm(tmp_path: Path, api: LocalAPI) -> None:
    """Two ``seedbatch run`` processes, each configured for the key's whole RPM, together keep that RPM."""
    rows, rpm = 120, 1800.0
    api.config = ServerConfig(latency_ms=20)
    shared = {"rpm": rpm, "concurrency": 16, "shared_limiter": "one-key", "shared_limiter_file": str(tmp_path / "l.db")}
    jobs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        frame = reviews(rows, start=0 if name == "a" else rows)  # distinct requests across the two jobs
        jobs.append(write_job(tmp_path / name, api, frame, limits=shared))
    with Poller(api) as poller:
        procs = [start(job) for job in jobs]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == ExitCode.OK, err.decode()
    measured, window = poller.rpm(2 * rows)
    ratio = measured / rpm
    manifests = [json.loads((job.parent / "out" / "result.parquet.manifest.json").read_text()) for job in jobs]
    starts = [dt.datetime.fromisoformat(m["started_at"]).timestamp() for m in manifests]
    ends = [dt.datetime.fromisoformat(m["ended_at"]).timestamp() for m in manifests]
    overlap = (min(ends) - max(starts)) / window
    print(
        f"\nshared limiter: {measured:,.0f}/min over {window:.1f} s = {ratio:.3f} x {rpm:,.0f}; overlap {overlap:.0%}"
    )
    assert overlap > 0.5, "the two jobs must have run mostly at the same time for this to prove anything"
    assert abs(ratio - 1.0) <= 0.05
    assert api.stats()["rate_limited"] == 0
    for job in jobs:
        assert pl.read_parquet(job.parent / "out" / "result.parquet").get_column("status").unique().to_list() == ["ok"]
