"""3. Client overhead: how many requests/s one core of client can drive, and its CPU per request.

Server (``seedbatch serve``, latency 0, no limits) pinned to core 0, client pinned to core 1, concurrency
256. CPU is the client process's own user+sys (``os.wait4``). A 200-row run gives the fixed cost
(interpreter start, imports, opening the input, writing the output) so the marginal cost can be shown.
"""

from __future__ import annotations

from common import (
    OUT,
    BenchResult,
    Server,
    answer_window,
    clean_job,
    client_cmd,
    has_taskset,
    make_reviews,
    require_ok,
    run_client,
    write_job,
)

NAME = "overhead"
TITLE = "Client overhead (latency-0 server on core 0, client on core 1)"

CONCURRENCY = 256
SMALL = 200
TARGET_RPS = 2000.0


def run(quick: bool) -> BenchResult:
    rows = 5000 if quick else 20_000
    result = BenchResult(NAME, TITLE)
    pin = has_taskset()
    result.settings.update(
        {
            "rows": f"{rows:,} (and {SMALL} for the fixed cost)",
            "server": "seedbatch serve, latency 0, no limits" + (", taskset -c 0" if pin else " (not pinned)"),
            "client": f"no rpm/tpm, concurrency {CONCURRENCY}" + (", taskset -c 1" if pin else " (not pinned)"),
            "reference (this machine, from the issue)": "OpenAI cookbook parallel processor ~530 req/s "
            "(0.7 ms CPU/request), Curator ~415 req/s, bare aiohttp loop ~8,800 req/s (server ceiling)",
        }
    )
    data = make_reviews(OUT / f"reviews_{rows}.parquet", rows)
    with Server(cpu=0) as server:
        name = "bench_overhead_small"
        clean_job(name)
        job = write_job(name, data, concurrency=CONCURRENCY)
        small = run_client(client_cmd("run", job, "--base-url", server.base_url, "--limit", str(SMALL), cpu=1))
        require_ok(small, "overhead (small)")
        server.reset()
        name = "bench_overhead"
        clean_job(name)
        job = write_job(name, data, concurrency=CONCURRENCY)
        cmd = client_cmd("run", job, "--base-url", server.base_url, cpu=1)
        with server.poll(0.1) as samples:
            big = run_client(cmd)
        stats = server.stats()
    require_ok(big, "overhead")
    result.commands += [f"server: {server.command}", f"client: {big.command}"]
    sent = int(big.summary.get("requests_sent", 0)) or int(stats["answered_ok"])
    e2e = sent / big.wall_s
    result.add(
        "requests/s end to end (requests ÷ client process wall time, start to exit)",
        f"{e2e:,.0f} ({sent:,} in {big.wall_s:.2f} s)",
        f"≥ {TARGET_RPS:,.0f}",
        e2e >= TARGET_RPS,
    )
    run_rps = float(big.summary.get("requests_per_s", 0.0))
    result.add("requests/s as the client reports it (run_job wall: read, send, write output)", f"{run_rps:,.0f}")
    window = answer_window(samples, sent)
    if window is not None:
        a, b = window
        server_rps = (b.answered_ok - a.answered_ok) / (b.t - a.t)
        result.add("requests/s at the server, first to last answer", f"{server_rps:,.0f}")
    result.add(
        "client CPU ms per request (user+sys ÷ requests)",
        f"{big.cpu_s * 1000 / sent:.3f} ms ({big.user_s:.2f} s user + {big.sys_s:.2f} s sys)",
    )
    marginal = (big.cpu_s - small.cpu_s) * 1000 / max(sent - SMALL, 1)
    result.add(
        "client CPU ms per request, marginal (minus the 200-row run's CPU)",
        f"{marginal:.3f} ms (fixed cost {small.cpu_s:.2f} s CPU, {small.wall_s:.2f} s wall)",
    )
    result.add("client CPU utilisation (CPU s ÷ wall s)", f"{big.cpu_s / big.wall_s:.0%}")
    return result
