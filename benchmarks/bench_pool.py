"""The worker pool with no rate known: a fast server, the job's defaults against hand-set caps.

With no RPM/TPM known the in-flight cap is all that shapes the run. On a fast server more requests in
flight only queue in the client (memory, CPU), so the pool must stop growing when throughput does: the
defaults should finish within 5% of the best hand-set cap's wall time, in at most 150 MB peak RSS.
The server is ``seedbatch serve`` (the local API over a socket, no limits, 5 ms latency): in the
client's process (``preset = "local"``) an answer is ready at once and nothing stays in flight. Wall
time is the client process's, spawn to exit; peak RSS its own (``wait4``); the most requests in flight
is the largest ``in_flight`` of its progress lines (one every 0.1 s).
"""

from __future__ import annotations

import json
from pathlib import Path

from common import (
    OUT,
    BenchResult,
    ClientRun,
    Server,
    _job_file,
    clean_job,
    client_cmd,
    make_reviews,
    require_ok,
    run_client,
)

NAME = "pool"
TITLE = "Worker pool with no rate known (fast server): defaults vs hand-set caps"

CAPS = (64, 128, 256, 512)
WALL_SLACK = 1.05
RSS_TARGET_MB = 150.0
LATENCY_MS = 5.0


def _run(server: Server, name: str, job_cap: int | None, data: Path) -> tuple[ClientRun, int]:
    clean_job(name)
    limits = [] if job_cap is None else [f"concurrency = {job_cap}"]
    job = _job_file(name, data, 16, limits, "vllm")
    cmd = [a for a in client_cmd("run", job, "--base-url", server.base_url) if a != "--no-progress"]
    cmd[-1] = "0.1"  # --progress-interval: the progress lines carry in_flight (stderr is not a terminal)
    run = run_client(cmd)
    require_ok(run, name)
    peak = 0
    for line in (OUT / "client.stderr").read_text(errors="replace").splitlines():
        if line.startswith("{") and '"in_flight"' in line:
            peak = max(peak, int(json.loads(line).get("in_flight", 0)))
    return run, peak


def run(quick: bool) -> BenchResult:
    rows = 2000 if quick else 10_000
    result = BenchResult(NAME, TITLE)
    result.settings.update(
        {
            "rows": f"{rows:,}",
            "server": f"seedbatch serve, latency {LATENCY_MS:g} ms, no limits",
            "client": "defaults (no rpm, tpm or concurrency) vs limits.concurrency = " + ", ".join(map(str, CAPS)),
        }
    )
    data = make_reviews(OUT / f"reviews_{rows}.parquet", rows)
    runs: dict[str, tuple[ClientRun, int]] = {}
    with Server(latency_ms=LATENCY_MS) as server:
        for cap in CAPS:
            runs[f"cap {cap}"] = _run(server, f"bench_pool_{cap}", cap, data)
        runs["defaults"] = _run(server, "bench_pool_defaults", None, data)
        result.commands.append(f"server: {server.command}")
    result.commands.append(f"client: {runs['defaults'][0].command}")
    for label, (r, peak) in runs.items():
        result.add(
            f"{label}: wall s, peak RSS MB, most in flight",
            f"{r.wall_s:.2f} s, {r.maxrss_mb:.0f} MB, {peak:,}",
        )
    best_label, (best, _) = min(((k, v) for k, v in runs.items() if k != "defaults"), key=lambda kv: kv[1][0].wall_s)
    default_run = runs["defaults"][0]
    ratio = default_run.wall_s / best.wall_s
    result.add(
        f"defaults' wall ÷ best hand-set cap's ({best_label})",
        f"{ratio:.3f} ({default_run.wall_s:.2f} s / {best.wall_s:.2f} s)",
        f"≤ {WALL_SLACK:g}",
        ratio <= WALL_SLACK,
    )
    result.add(
        "defaults' peak RSS",
        f"{default_run.maxrss_mb:.0f} MB",
        f"≤ {RSS_TARGET_MB:g} MB",
        default_run.maxrss_mb <= RSS_TARGET_MB,
    )
    return result


if __name__ == "__main__":
    import sys

    outcome = run("--quick" in sys.argv)
    for figure in outcome.figures:
        print(figure)
