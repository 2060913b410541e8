"""8. Closed-loop pacing: wall time a user feels, from ``seedbatch run`` process start to exit.

Each scenario starts a local API process (``seedbatch serve``: per-minute limits enforced over 1-second
windows, ``x-ratelimit-*`` headers, ``Retry-After`` on 429, optional 5xx / dropped connections / hangs)
and one ``seedbatch run <job>`` subprocess against it. The job keeps the DEFAULT limits (no concurrency,
attempts or timeouts) except the ``rpm`` a scenario names, so the figure stays valid however the client
paces. The headline figure is

    ratio = ideal wall ÷ achieved wall,   ideal wall = rows ÷ (server limit per second) + mean latency

with the achieved wall measured around the client process (interpreter start and output write included).
A narrower server-side window (first request to last answer) is shown too, labeled as such (info only).
Counts: server ``/_stats`` (received, answered ok, 429s, ``duplicates`` = ok answers for a body hash
already answered ok, i.e. paid twice), client summary line (retries, 429s, rows by status) and the
output Parquet (rows ok at exit).

Run a subset directly (figures to benchmarks/out/RESULTS.pacing[.quick].md):

    python benchmarks/bench_pacing.py --scenarios 2,3,4,5,7 [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    OUT,
    ROOT,
    SEEDBATCH,
    BenchResult,
    ClientRun,
    Sample,
    Server,
    clean_job,
    client_cmd,
    make_reviews,
    rel,
    run_client,
    shell,
    write_default_job,
)

NAME = "pacing"
TITLE = "Closed-loop pacing (wall time, process start to exit)"

#: ``--scenarios`` given to this file's own CLI; None = all (what ``run_all.py --only pacing`` runs).
SELECTED: set[int] | None = None


@dataclass
class Scenario:
    num: int
    title: str
    rows: int
    quick_rows: int
    latency_ms: float
    jitter_ms: float
    server_rpm: float | None
    job_rpm: float | None
    target: float  # minimum of ideal ÷ achieved wall
    max_429_frac: float | None = None  # ≤ this fraction of rows refused (server count)
    all_ok: bool = False  # every row ok at exit
    no_dupes: bool = False  # nothing paid twice
    faults: tuple[str, ...] = ()
    bound_s: float = 300.0
    quick_latency_ms: float | None = None
    quick_jitter_ms: float | None = None
    quick_faults: tuple[str, ...] | None = None
    quick_bound_s: float = 120.0
    stream: bool = False  # the job sets endpoint.stream (stall_s left at its default)


SCENARIOS = [
    Scenario(
        num=1, title="slow reasoning model (20 s ± 5 s, 6,000 RPM)", rows=3000, quick_rows=600,
        latency_ms=20000, jitter_ms=5000, server_rpm=6000, job_rpm=6000, target=0.90,
        bound_s=400, quick_latency_ms=2000, quick_jitter_ms=500,
    ),
    Scenario(
        num=2, title="300 ms, 6,000 RPM both sides", rows=2000, quick_rows=200,
        latency_ms=300, jitter_ms=0, server_rpm=6000, job_rpm=6000, target=0.95, max_429_frac=0.01,
    ),
    Scenario(
        num=3, title="job says 12,000 RPM, server allows 3,000", rows=600, quick_rows=60,
        latency_ms=100, jitter_ms=0, server_rpm=3000, job_rpm=12000, target=0.85, all_ok=True,
    ),
    Scenario(
        num=4, title="no RPM in the job, server 3,000 RPM with headers", rows=1500, quick_rows=150,
        latency_ms=100, jitter_ms=0, server_rpm=3000, job_rpm=None, target=0.90, max_429_frac=0.01,
    ),
    Scenario(
        num=5, title="5% 5xx + 2% dropped connections, 6,000 RPM", rows=2000, quick_rows=200,
        latency_ms=100, jitter_ms=0, server_rpm=6000, job_rpm=6000, target=0.90,
        all_ok=True, no_dupes=True, faults=("--fail-5xx", "0.05", "--drop", "0.02"),
    ),
    Scenario(
        num=6, title="0.5% of requests hang 120 s, 6,000 RPM", rows=2000, quick_rows=200,
        latency_ms=100, jitter_ms=0, server_rpm=6000, job_rpm=6000, target=0.50,
        faults=("--hang", "0.005", "--hang-s", "120"), bound_s=400,
        quick_faults=("--hang", "0.02", "--hang-s", "30"),
    ),
    Scenario(
        num=8, title="S6 with endpoint.stream = true: 0.5% of streams stall 120 s after their first chunk",
        rows=2000, quick_rows=200, latency_ms=100, jitter_ms=0, server_rpm=6000, job_rpm=6000, target=0.50,
        faults=("--hang", "0.005", "--hang-s", "120"), bound_s=400,
        quick_faults=("--hang", "0.02", "--hang-s", "30"), stream=True,
    ),
]  # fmt: skip
SMALL_ROWS = 10
SMALL_WALL_S = 0.5
SMALL_RSS_MB = 100.0
HELP_WALL_S = 0.2


def _rows_ok(output: Path) -> tuple[int, dict[str, int]]:
    """Rows with status ok in the output Parquet, and all statuses (empty if there is no output)."""
    if not output.exists():
        return 0, {}
    import polars as pl

    counts = pl.read_parquet(output, columns=["status"]).get_column("status").value_counts()
    by = {str(k): int(v) for k, v in counts.iter_rows()}
    return by.get("ok", 0), by


def _window(samples: list[Sample], t0: float) -> tuple[float, float, float] | None:
    """(s after spawn of the first poll showing a request, of the first showing the final answer count, answers)."""
    first = next((s for s in samples if s.received > 0), None)
    if first is None or not samples:
        return None
    final = samples[-1].answered_ok
    last = next((s for s in samples if s.answered_ok >= final), None)
    if last is None or last.t <= first.t:
        return None
    # Every answer came after the first request, so all of them count (the first sample may lag it by a poll).
    return first.t - t0, last.t - t0, float(final)


def run_scenario(result: BenchResult, sc: Scenario, quick: bool) -> None:
    rows = sc.quick_rows if quick else sc.rows
    latency = sc.quick_latency_ms if quick and sc.quick_latency_ms is not None else sc.latency_ms
    jitter = sc.quick_jitter_ms if quick and sc.quick_jitter_ms is not None else sc.jitter_ms
    faults = sc.quick_faults if quick and sc.quick_faults is not None else sc.faults
    bound = sc.quick_bound_s if quick else sc.bound_s
    assert sc.server_rpm is not None
    per_s = sc.server_rpm / 60.0
    ideal = rows / per_s + latency / 1000.0  # jitter is uniform ±, so the mean latency is latency_ms
    tag = f"S{sc.num}"
    name = f"bench_pacing_{sc.num}"
    data = make_reviews(OUT / f"reviews_{rows}.parquet", rows)
    clean_job(name)
    job = write_default_job(name, data, rpm=sc.job_rpm, stream=sc.stream)
    with Server(latency_ms=latency, jitter_ms=jitter, rpm=sc.server_rpm, extra=faults) as server:
        cmd = client_cmd("run", job, "--base-url", server.base_url)
        with server.poll(0.2) as samples:
            t0 = time.monotonic()
            run = run_client(cmd, kill_after=bound)
        stats = server.stats()
    result.commands += [f"{tag} server: {server.command}", f"{tag} client: {run.command}"]
    result.settings[f"{tag} {sc.title}"] = (
        f"{rows:,} rows; server latency {latency:.0f} ± {jitter:.0f} ms (uniform), rpm {sc.server_rpm:,.0f}"
        f"{' ' + ' '.join(faults) if faults else ''}; job "
        f"{f'rpm = {sc.job_rpm:,.0f}' if sc.job_rpm is not None else 'no rpm'}, other limits default; "
        f"ideal {ideal:.1f} s; bounded at {bound:.0f} s"
    )
    ok, by_status = _rows_ok(OUT / f"{name}.parquet")
    if run.returncode != 0 and not run.killed:
        result.notes.append(f"{tag}: client exited {run.returncode}: {run.stderr_tail[-600:]}")
    unique_ok = len(stats.get("ok_by_body_hash", {}))
    dupes = int(stats.get("duplicates", -1))
    refused = int(stats["rate_limited"])
    ratio = ideal / run.wall_s
    target = f"≥ {sc.target:.2f} (ideal {ideal:.1f} s)"
    if run.killed:
        result.add(
            f"{tag} {sc.title}: ideal ÷ wall",
            f"< {ratio:.3f} (killed at {bound:.0f} s, not finished: {unique_ok:,} of {rows:,} rows answered at server)",
            target,
            False,
        )
    else:
        # A fast exit that did not answer every row is no throughput: the ratio only counts when all rows are ok.
        short = f"; only {ok:,} of {rows:,} rows ok" if ok < rows else ""
        result.add(
            f"{tag} {sc.title}: ideal ÷ wall (process start to exit)",
            f"{ratio:.3f} ({run.wall_s:.1f} s wall, exit {run.returncode}{short})",
            target,
            ratio >= sc.target and ok == rows,
        )
    if sc.max_429_frac is not None:
        result.add(
            f"{tag} 429s (server count)",
            f"{refused:,} ({refused / rows:.1%} of rows)",
            f"≤ {sc.max_429_frac:.0%} of rows",
            refused <= sc.max_429_frac * rows,
        )
    if sc.all_ok:
        lost = rows - ok
        result.add(f"{tag} rows not ok at exit (lost)", f"{lost:,} ({ok:,} of {rows:,} ok)", "0", lost == 0)
    if sc.no_dupes:
        result.add(
            f"{tag} paid twice (server: ok answers for a body already answered ok)", f"{dupes:,}", "0", dupes == 0
        )
    s = run.summary
    result.add(
        f"{tag} counts (info)",
        f"rows ok {ok:,}, failed {sum(v for k, v in by_status.items() if k != 'ok'):,}"
        f"{' ' + str(by_status) if set(by_status) - {'ok'} else ''}; "
        f"server: received {int(stats['received']):,}, ok {int(stats['answered_ok']):,}, 429 {refused:,}, "
        f"5xx {sum(int(n) for c, n in stats.get('by_status', {}).items() if int(c) >= 500):,}, "
        f"dropped {int(stats.get('dropped', 0)):,}, hung {int(stats.get('hung', 0)):,}, paid twice {dupes:,}; "
        f"client: sent {s.get('requests_sent', '?')}, retries {s.get('retries', '?')}, 429 {s.get('http_429', '?')}; "
        f"CPU {run.cpu_s:.1f} s, peak RSS {run.maxrss_mb:.0f} MB",
    )
    win = _window(samples, t0)
    if win is not None:
        first, last, answered = win
        result.add(
            f"{tag} narrower window (info, server-side, NOT the wall figure): first request to last answer",
            f"{answered / (last - first) / per_s:.3f} of the limit ({answered:,.0f} answers over {last - first:.1f} s; "
            f"first request at +{first:.2f} s after spawn, last answer at +{last:.1f} s)",
        )
    print(
        f"   [{tag}] wall {run.wall_s:.1f} s, ideal {ideal:.1f} s, ratio {ratio:.3f}, killed {run.killed}", flush=True
    )


def _timed(cmd: list[str], timeout_s: float = 60.0) -> float:
    t = time.monotonic()
    subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout_s, check=True)
    return time.monotonic() - t


def run_small(result: BenchResult) -> None:
    """Scenario 7: 10 rows at latency 0 (preset local, in-process API), then the same against a server; --help."""
    tag = "S7"
    data = make_reviews(OUT / f"reviews_{SMALL_ROWS}.parquet", SMALL_ROWS)
    name = "bench_pacing_7"
    job = write_default_job(name, data, preset="local")
    runs: list[ClientRun] = []
    for _ in range(3):
        clean_job(name)
        runs.append(run_client(client_cmd("run", job), kill_after=60))
    walls = sorted(r.wall_s for r in runs)
    rss = max(r.maxrss_mb for r in runs)
    ok, _ = _rows_ok(OUT / f"{name}.parquet")
    if ok != SMALL_ROWS:
        result.notes.append(f"S7: the last preset-local run left {ok} of {SMALL_ROWS} rows ok: {runs[-1].stderr_tail}")
    result.commands.append(f"{tag} client: {runs[0].command}")
    result.settings[f"{tag} small job"] = (
        f"{SMALL_ROWS} rows, preset local (built-in API in-process, latency 0), default limits; 3 fresh runs; "
        f"then the same rows against a `seedbatch serve` (latency 0, no limits); `seedbatch --help` 5 times"
    )
    result.add(
        f"{tag} {SMALL_ROWS} rows, preset local: wall, process start to exit (median of 3)",
        f"{statistics.median(walls):.2f} s (runs {', '.join(f'{w:.2f}' for w in walls)}; {ok} ok; "
        f"exit {runs[-1].returncode})",
        f"≤ {SMALL_WALL_S} s",
        statistics.median(walls) <= SMALL_WALL_S and ok == SMALL_ROWS,
    )
    result.add(
        f"{tag} {SMALL_ROWS} rows, preset local: peak RSS of the seedbatch process (max of 3, its own)",
        f"{rss:.0f} MB",
        f"≤ {SMALL_RSS_MB:.0f} MB",
        rss <= SMALL_RSS_MB,
    )
    name_s = "bench_pacing_7s"
    job_s = write_default_job(name_s, data)
    with Server() as server:
        srv_runs = []
        for _ in range(3):
            clean_job(name_s)
            srv_runs.append(run_client(client_cmd("run", job_s, "--base-url", server.base_url), kill_after=60))
    result.commands += [f"{tag} server: {server.command}", f"{tag} client: {srv_runs[0].command}"]
    sw = sorted(r.wall_s for r in srv_runs)
    result.add(
        f"{tag} {SMALL_ROWS} rows against a server: wall (median of 3), peak RSS (info)",
        f"{statistics.median(sw):.2f} s (runs {', '.join(f'{w:.2f}' for w in sw)}), "
        f"{max(r.maxrss_mb for r in srv_runs):.0f} MB",
    )
    help_cmd = [*SEEDBATCH, "--help"]
    helps = sorted(_timed(help_cmd) for _ in range(5))
    result.commands.append(f"{tag} help: {shell(help_cmd)}")
    result.add(
        f"{tag} `seedbatch --help` wall (median of 5)",
        f"{statistics.median(helps):.3f} s (runs {', '.join(f'{w:.3f}' for w in helps)})",
        f"≤ {HELP_WALL_S} s",
        statistics.median(helps) <= HELP_WALL_S,
    )


def _which_pipeline() -> str:
    """The pipeline package a ``python -m pipeline`` subprocess (cwd = project root) imports: must be this tree's."""
    out = subprocess.run(
        [sys.executable, "-c", "import pipeline; print(pipeline.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


def run(quick: bool, scenarios: set[int] | None = None) -> BenchResult:
    chosen = scenarios if scenarios is not None else SELECTED
    result = BenchResult(NAME, TITLE)
    used = _which_pipeline()
    result.settings["seedbatch code the subprocesses run"] = f"{rel(Path(used))} (cwd {ROOT})"
    if Path(used).resolve().parent.parent != ROOT:
        result.notes.append(f"WARNING: subprocesses import {used}, not this tree's pipeline/")
    result.settings["ratio"] = (
        "ideal ÷ achieved wall; ideal = rows ÷ (server limit per second) + mean latency; achieved = wall time "
        "around the `seedbatch run` process (spawn to exit, start-up and output included)"
    )
    result.settings["job"] = "default [limits] (no concurrency, max_attempts or timeouts) except the rpm named"
    if quick:
        result.notes.append(
            "QUICK: rows ÷10; S1 at 2,000 ± 500 ms latency and 600 rows; S6 with 2% of requests hung 30 s "
            "(0.5% of 200 rows would be about one); bounds 120 s"
        )
    for sc in SCENARIOS:
        if chosen is not None and sc.num not in chosen:
            continue
        print(f"   -- S{sc.num}: {sc.title}", flush=True)
        try:
            run_scenario(result, sc, quick)
        except Exception as exc:  # one scenario failing must not hide the others
            result.add(f"S{sc.num} {sc.title}", f"harness error: {exc!r}"[:300], "", False)
    if chosen is None or 7 in chosen:
        print("   -- S7: small job, --help", flush=True)
        try:
            run_small(result)
        except Exception as exc:
            result.add("S7 small job", f"harness error: {exc!r}"[:300], "", False)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--scenarios", default="", help="comma-separated scenario numbers 1-8 (default: all)")
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args()
    chosen = {int(x) for x in args.scenarios.split(",") if x.strip()} or None
    import run_all

    started = time.monotonic()
    result = run(args.quick, chosen)
    for f in result.figures:
        met = "" if f.met is None else ("  [ok]" if f.met else "  [MISSED]")
        print(f"   {f.label}: {f.value}{f'  (target {f.target})' if f.target else ''}{met}", flush=True)
    output = args.output or OUT / f"RESULTS.pacing{'.quick' if args.quick else ''}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(Exception):
        result.figures = [_with_cmd(f, args) for f in result.figures]
    output.write_text(run_all.render([result], args.quick, sys.argv[1:], time.monotonic() - started))
    print(f"wrote {output}")
    return 0


def _with_cmd(f: Any, args: argparse.Namespace) -> Any:
    """Figures run from this CLI reproduce with this CLI (and the scenario subset)."""
    f.command = "python benchmarks/bench_pacing.py" + (f" --scenarios {args.scenarios}" if args.scenarios else "")
    return f


if __name__ == "__main__":
    sys.exit(main())
