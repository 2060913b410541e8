"""1. Limit-bound throughput: does the client use the whole RPM (or TPM) quota without provoking 429s?

The server enforces the same limit the client paces to (both 6,000 RPM; or both the same TPM with long
prompts). Achieved rate is measured at the server from its ``/_stats`` counters sampled every 100 ms:
requests admitted (received minus 429) between the first admission and the last, and for TPM the tokens
the server's limiter counted (prompt + max_tokens) between the first answer and the last.
"""

from __future__ import annotations

from common import (
    OUT,
    STORM_FRACTION,
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

NAME = "throughput"
TITLE = "Limit-bound throughput (RPM, then TPM)"

LATENCY_MS = 300.0
JITTER_MS = 100.0
RPM = 6000.0
TPM = 3_000_000.0
PAD_SENTENCES = 150  # ~1,000 prompt tokens per row: the token limit binds long before the request limit
TPM_MAX_TOKENS = 16
# A 429 "storm": more than 1% of requests refused.


def run_rpm(result: BenchResult, rows: int) -> None:
    name = "bench_rpm"
    data = make_reviews(OUT / f"reviews_{rows}.parquet", rows)
    clean_job(name)
    job = write_job(name, data, rpm=RPM, concurrency=128, max_tokens=64)
    with Server(latency_ms=LATENCY_MS, jitter_ms=JITTER_MS, rpm=RPM) as server:
        cmd = client_cmd("run", job, "--base-url", server.base_url)
        with server.poll(0.1) as samples:
            run = run_client(cmd)
        stats = server.stats()
    require_ok(run, "rpm")
    result.commands += [f"server: {server.command}", f"client: {run.command}"]
    measured = admitted_rate(samples, rows)
    if measured is None:
        result.add("RPM: achieved ÷ limit", "not measurable (no admissions seen)", "≥ 0.97", False)
        return
    rate, window = measured
    ratio = rate / RPM
    refused = int(stats["rate_limited"])
    client_429 = int(run.summary.get("http_429", -1))
    storm = refused > STORM_FRACTION * rows
    result.add(
        "RPM: achieved requests/min ÷ limit (server-side, admitted)",
        f"{pct(ratio)} ({rate:,.0f}/min over {window:.1f} s)",
        "≥ 0.97",
        ratio >= 0.97,
    )
    result.add(
        "RPM: 429s received by the client (server counted)",
        f"{client_429:,} ({refused:,})",
        f"no storm (≤ {STORM_FRACTION:.0%} of requests)",
        not storm,
    )
    window_ans = answer_window(samples, rows)
    if window_ans is not None:
        a, b = window_ans
        result.add(
            "RPM: answers/min ÷ limit, first to last answer (info)",
            pct((b.answered_ok - a.answered_ok) / (b.t - a.t) * 60.0 / RPM),
        )
    result.add("RPM: client wall time, CPU seconds", f"{run.wall_s:.1f} s, {run.cpu_s:.1f} s")


def run_tpm(result: BenchResult, rows: int) -> None:
    name = "bench_tpm"
    data = make_reviews(OUT / f"long_reviews_{rows}.parquet", rows, seed=11, pad_sentences=PAD_SENTENCES)
    clean_job(name)
    job = write_job(name, data, tpm=TPM, concurrency=256, max_tokens=TPM_MAX_TOKENS)
    with Server(latency_ms=LATENCY_MS, jitter_ms=JITTER_MS, tpm=TPM) as server:
        cmd = client_cmd("run", job, "--base-url", server.base_url)
        with server.poll(0.1) as samples:
            run = run_client(cmd)
        stats = server.stats()
    require_ok(run, "tpm")
    result.commands += [f"server: {server.command}", f"client: {run.command}"]
    window = answer_window(samples, rows)
    if window is None:
        result.add("TPM: achieved ÷ limit", "not measurable (no answers seen)", "≥ 0.95", False)
        return
    a, b = window
    span = b.t - a.t
    # What the server's limiter charges per admitted request: its prompt count + max_tokens.
    counted = (b.prompt_tokens - a.prompt_tokens) + (b.answered_ok - a.answered_ok) * TPM_MAX_TOKENS
    used = (b.prompt_tokens - a.prompt_tokens) + (b.completion_tokens - a.completion_tokens)
    ratio = counted / span * 60.0 / TPM
    refused = int(stats["rate_limited"])
    client_429 = int(run.summary.get("http_429", -1))
    result.add(
        "TPM: achieved tokens/min ÷ limit (server-side, as its limiter counts: prompt + max_tokens)",
        f"{pct(ratio)} ({counted / span * 60:,.0f}/min over {span:.1f} s)",
        "≥ 0.95",
        ratio >= 0.95,
    )
    result.add("TPM: billed tokens/min ÷ limit (prompt + completion, info)", pct(used / span * 60.0 / TPM))
    result.add(
        "TPM: 429s received by the client (server counted)",
        f"{client_429:,} ({refused:,})",
        f"no storm (≤ {STORM_FRACTION:.0%} of requests)",
        refused <= STORM_FRACTION * rows,
    )
    avg_prompt = stats["prompt_tokens"] / max(stats["answered_ok"], 1)
    result.settings["TPM prompt size"] = f"~{avg_prompt:,.0f} tokens/row (server's count), max_tokens {TPM_MAX_TOKENS}"
    result.add("TPM: client wall time, CPU seconds", f"{run.wall_s:.1f} s, {run.cpu_s:.1f} s")


def run(quick: bool) -> BenchResult:
    rows = 600 if quick else 3000
    tpm_rows = 400 if quick else 3000
    result = BenchResult(NAME, TITLE)
    result.settings.update(
        {
            "rows": f"{rows:,} (RPM), {tpm_rows:,} (TPM)",
            "server": f"seedbatch serve, latency {LATENCY_MS:.0f} ± {JITTER_MS:.0f} ms",
            "RPM case": f"server and client rpm = {RPM:,.0f}, concurrency 128",
            "TPM case": f"server and client tpm = {TPM:,.0f}, no rpm, concurrency 256",
            "measurement": "server /_stats sampled every 100 ms; window = first to last admission/answer",
        }
    )
    run_rpm(result, rows)
    run_tpm(result, tpm_rows)
    return result
