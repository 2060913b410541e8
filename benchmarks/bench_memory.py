"""4. Memory: peak RSS of the client over a 1,000,000-row Parquet input (and over its first 100k rows).

Input: the sample generator's reviews (realistic 60-250 character texts), written once to benchmarks/out/.
Server: ``seedbatch serve`` latency 0 in its own process. Client: high rpm/tpm (pacers active, never binding).
The first run answers ``--limit`` rows on a fresh ledger; the second runs the whole file on the same ledger
(it sends the remaining rows, then writes the 1M-row output). Peak RSS is the client process's own
VmHWM, polled by ``common.run_client``. The answered ledger is reused by the resume benchmark.
"""

from __future__ import annotations

from pathlib import Path

from common import (
    OUT,
    BenchResult,
    ClientRun,
    Server,
    clean_job,
    client_cmd,
    free_port,
    make_reviews,
    require_ok,
    run_client,
    write_job,
)

#: The server's port, reused by the resume benchmark: its rerun must reach the endpoint that answered.
PORT = free_port()
NAME = "memory"
TITLE = "Memory (peak RSS of the client over a large input)"

JOB = "bench_memory"
TARGET_MB = 400.0
HIGH_RPM = 10_000_000.0
HIGH_TPM = 10_000_000_000.0
CONCURRENCY = 256


def sizes(quick: bool) -> tuple[int, int]:
    """(total rows, rows of the first, limited run)."""
    return (100_000, 20_000) if quick else (1_000_000, 100_000)


def input_path(quick: bool) -> Path:
    total, _ = sizes(quick)
    return make_reviews(OUT / f"big_reviews_{total}.parquet", total, seed=20261123)


def job_path(quick: bool) -> Path:
    return write_job(
        JOB + ("_quick" if quick else ""),
        input_path(quick),
        rpm=HIGH_RPM,
        tpm=HIGH_TPM,
        concurrency=CONCURRENCY,
        max_tokens=64,
    )


def answer_all(quick: bool, server: Server, *, fresh: bool) -> tuple[ClientRun | None, ClientRun]:
    """Run the limited then the full job; returns both runs (the first is None when not ``fresh``)."""
    _, first_n = sizes(quick)
    name = JOB + ("_quick" if quick else "")
    job = job_path(quick)
    first = None
    if fresh:
        clean_job(name)
        first = run_client(client_cmd("run", job, "--base-url", server.base_url, "--limit", str(first_n)))
        require_ok(first, "memory (first rows)")
    full = run_client(client_cmd("run", job, "--base-url", server.base_url))
    require_ok(full, "memory (all rows)")
    return first, full


def run(quick: bool) -> BenchResult:
    total, first_n = sizes(quick)
    result = BenchResult(NAME, TITLE)
    data = input_path(quick)
    result.settings.update(
        {
            "input": f"{data.name}: {total:,} rows, {data.stat().st_size / 1e6:,.1f} MB Parquet "
            "(benchmarks/common.py make_reviews, texts from data/make_samples.py)",
            "server": "seedbatch serve, latency 0, no limits (own process)",
            "client": f"rpm {HIGH_RPM:,.0f}, tpm {HIGH_TPM:,.0f} (never binding), concurrency {CONCURRENCY}",
            "runs": f"--limit {first_n:,} on a fresh ledger, then the whole file on the same ledger",
        }
    )
    with Server(port=PORT) as server:
        first, full = answer_all(quick, server, fresh=True)
        stats = server.stats()
    assert first is not None
    result.commands += [f"server: {server.command}", f"client: {first.command}", f"client: {full.command}"]
    for label, r in ((f"first {first_n:,} rows (--limit)", first), (f"all {total:,} rows", full)):
        result.add(
            f"peak RSS, {label}",
            f"{r.maxrss_mb:,.0f} MB",
            f"< {TARGET_MB:.0f} MB",
            r.maxrss_mb < TARGET_MB,
        )
        sent = int(r.summary.get("requests_sent", 0))
        result.add(
            f"wall, CPU, requests sent, {label}",
            f"{r.wall_s:,.1f} s wall, {r.cpu_s:,.1f} s CPU, {sent:,} sent ({sent / r.wall_s:,.0f}/s)",
        )
    ok = int(full.summary.get("rows_ok", 0))
    result.add("rows ok in the final output", f"{ok:,} of {total:,}", f"{total:,}", ok == total)
    result.notes.append(f"server answered {stats['answered_ok']:,} requests, {stats['duplicates']:,} duplicates")
    return result
