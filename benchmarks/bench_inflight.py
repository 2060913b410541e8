"""2. Many in flight: a slow server (20 s ± 5 s) at 6,000 RPM keeps ~2,000 requests open at once.

The client must still admit requests at the limit (measured at the server: admissions between the first
and the last) and not burn CPU on thousands of idle connections (user+sys of the client process).
"""

from __future__ import annotations

from common import (
    OUT,
    BenchResult,
    Server,
    admitted_rate,
    answer_window,
    clean_job,
    client_cmd,
    make_reviews,
    pct,
    require_ok,
    run_client,
    write_job,
)

NAME = "inflight"
TITLE = "Many requests in flight (slow server at the RPM limit)"

RPM = 6000.0


def run(quick: bool) -> BenchResult:
    rows = 2000 if quick else 6000
    latency_ms, jitter_ms = (5000.0, 1250.0) if quick else (20000.0, 5000.0)
    expected_in_flight = RPM / 60.0 * latency_ms / 1000.0
    concurrency = int(expected_in_flight * 1.5) + 64  # never the binding limit, even at the slow end of jitter
    result = BenchResult(NAME, TITLE)
    result.settings.update(
        {
            "rows": f"{rows:,}",
            "server": f"seedbatch serve, latency {latency_ms / 1000:g} s ± {jitter_ms / 1000:g} s, rpm {RPM:,.0f}",
            "client": f"rpm {RPM:,.0f}, concurrency {concurrency:,}",
            "expected in flight": f"~{expected_in_flight:,.0f} (rate × mean latency)",
        }
    )
    name = "bench_inflight"
    data = make_reviews(OUT / f"reviews_{rows}.parquet", rows)
    clean_job(name)
    job = write_job(name, data, rpm=RPM, concurrency=concurrency, max_tokens=64)
    with Server(latency_ms=latency_ms, jitter_ms=jitter_ms, rpm=RPM) as server:
        cmd = client_cmd("run", job, "--base-url", server.base_url)
        with server.poll(0.25) as samples:
            run_ = run_client(cmd)
        stats = server.stats()
    require_ok(run_, "inflight")
    result.commands += [f"server: {server.command}", f"client: {run_.command}"]
    measured = admitted_rate(samples, rows)
    if measured is None:
        result.add("achieved RPM ÷ limit", "not measurable", "≥ 0.95", False)
        return result
    rate, seconds = measured
    peak_open = max(s.received - s.answered_ok - s.rate_limited for s in samples)
    result.add(
        "achieved requests/min ÷ limit (server-side, admitted)",
        f"{pct(rate / RPM)} ({rate:,.0f}/min over {seconds:.1f} s)",
        "≥ 0.95",
        rate / RPM >= 0.95,
    )
    result.add("peak requests open at the server", f"{peak_open:,}")
    result.add(
        "client CPU seconds (user + sys)",
        f"{run_.cpu_s:.1f} s ({run_.user_s:.1f} + {run_.sys_s:.1f}) over {run_.wall_s:.0f} s wall; "
        f"{run_.cpu_s * 1000 / max(rows, 1):.2f} ms/request",
    )
    result.add("client peak RSS", f"{run_.maxrss_mb:,.0f} MB")
    result.add(
        "429s received by the client (server counted)",
        f"{run_.summary.get('http_429', -1):,} ({stats['rate_limited']:,})",
    )
    window = answer_window(samples, rows)
    if window is not None:
        a, b = window
        result.add(
            "answers/min ÷ limit, first to last answer (info; widened by the ± jitter)",
            pct((b.answered_ok - a.answered_ok) / (b.t - a.t) * 60.0 / RPM),
        )
    return result
