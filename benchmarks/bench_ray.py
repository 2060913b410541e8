"""7. Cluster-wide RPM: a job on 2 Ray workers (a local Ray started by the client) under one RPM limit.

The server enforces the same limit the job sets (6,000 RPM); both shards take from the one limits actor,
so together they should use the whole quota and no more. Achieved rate is measured at the server from
its ``/_stats`` counters sampled every 100 ms: requests admitted (received minus 429) between the first
admission and the last, as in the throughput benchmark. Needs the ``ray`` extra.
"""

from __future__ import annotations

import importlib.util

from common import (
    OUT,
    STORM_FRACTION,
    BenchResult,
    Server,
    admitted_rate,
    clean_job,
    client_cmd,
    make_reviews,
    pct,
    require_ok,
    run_client,
    write_job,
)

NAME = "ray"
TITLE = "Cluster-wide RPM with 2 Ray workers"

LATENCY_MS = 300.0
JITTER_MS = 100.0
RPM = 6000.0
WORKERS = 2
CONCURRENCY = 64  # per shard: 2 x 64 in flight cover 100 requests/s at 300 ms
# A 429 "storm": more than 1% of requests refused.


def run(quick: bool) -> BenchResult:
    if importlib.util.find_spec("ray") is None:
        raise RuntimeError("the ray benchmark needs Ray: pip install 'seedbatch[ray]' (or make test-ray once)")
    rows = 1200 if quick else 6000
    result = BenchResult(NAME, TITLE)
    result.settings.update(
        {
            "rows": f"{rows:,}",
            "server": f"seedbatch serve, latency {LATENCY_MS:.0f} ± {JITTER_MS:.0f} ms, rpm {RPM:,.0f}",
            "client": f"rpm {RPM:,.0f}, --executor ray --workers {WORKERS}, concurrency {CONCURRENCY} per shard",
            "ray": "a local Ray instance started by the client (ray.init), all cores",
            "measurement": "server /_stats sampled every 100 ms; window = first to last admission",
        }
    )
    name = "bench_ray"
    data = make_reviews(OUT / f"reviews_{rows}.parquet", rows)
    clean_job(name)
    job = write_job(name, data, rpm=RPM, concurrency=CONCURRENCY, max_tokens=64)
    with Server(latency_ms=LATENCY_MS, jitter_ms=JITTER_MS, rpm=RPM) as server:
        cmd = client_cmd("run", job, "--base-url", server.base_url, "--executor", "ray", "--workers", str(WORKERS))
        with server.poll(0.1) as samples:
            client = run_client(cmd)
        stats = server.stats()
    require_ok(client, "ray")
    result.commands += [f"server: {server.command}", f"client: {client.command}"]
    measured = admitted_rate(samples, rows)
    if measured is None:
        result.add("RPM: achieved ÷ limit", "not measurable (no admissions seen)", "0.95 to 1.00", False)
        return result
    rate, window = measured
    ratio = rate / RPM
    refused = int(stats["rate_limited"])
    result.add(
        f"RPM with {WORKERS} Ray workers: achieved requests/min ÷ limit (server-side, admitted)",
        f"{pct(ratio)} ({rate:,.0f}/min over {window:.1f} s)",
        "0.95 to 1.00 (whole quota, never over it)",
        0.95 <= ratio <= 1.005,
    )
    result.add(
        "429s received by the client (server counted)",
        f"{int(client.summary.get('http_429', -1)):,} ({refused:,})",
        f"no storm (≤ {STORM_FRACTION:.0%} of requests)",
        refused <= STORM_FRACTION * rows,
    )
    result.add(
        "requests answered twice (server)",
        f"{int(stats['duplicates']):,}",
        "0",
        int(stats["duplicates"]) == 0,
    )
    result.add(
        "client wall time (Ray start included), CPU seconds of the driver",
        f"{client.wall_s:.1f} s, {client.cpu_s:.1f} s",
    )
    result.notes.append(
        "CPU seconds are the driver process's own; the shards run in Ray worker processes and are not counted."
    )
    return result


if __name__ == "__main__":
    import sys

    for figure in run("--quick" in sys.argv).figures:
        print(f"{figure.label}: {figure.value}  (target {figure.target or '-'}, met {figure.met})")
