"""11. Failure that is not random: what a run sends, keeps and says when the provider or the setup is wrong.

Each case starts a local API process (``seedbatch serve``) that fails systematically and one
``seedbatch run <job>`` subprocess with the job's default limits, except ``limits.outage_wait_s`` where a
case names it (the default is 600 s; one case keeps it, the others wait 60 s to keep the benchmark short).
Counts come from the server (``/_stats``: received, answered with 200, ``duplicates`` = 200s for a body
already answered, i.e. paid twice), the ledger (answers kept) and the client (exit code, wall time from
process start to exit, its summary line).

    python benchmarks/bench_failures.py [--quick] [--cases revoke,down,recover,setup,limits]
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import statistics
import sys
import time
from pathlib import Path

from common import (
    OUT,
    BenchResult,
    ClientRun,
    Server,
    _job_file,
    clean_job,
    client_cmd,
    free_port,
    make_reviews,
    run_client,
)

NAME = "failures"
TITLE = "Failure that is not random (key revoked, provider down, setup wrong, a limit no header tells of)"


def _job(name: str, rows: Path, *, rpm: float | None = None, outage_wait_s: float | None = None) -> Path:
    limits = [f"rpm = {rpm}"] if rpm is not None else []
    if outage_wait_s is not None:
        limits.append(f"outage_wait_s = {outage_wait_s}")
    return _job_file(name, rows, 64, limits, "vllm")


def _ledger_ok(name: str) -> int:
    path = OUT / f"{name}.parquet.ledger.sqlite"
    if not path.exists():
        return 0
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT count(*) FROM answers WHERE status = 'ok'").fetchone()[0])
    finally:
        db.close()


def _run(name: str, job: Path, server: Server, timeout_s: float = 1800.0) -> ClientRun:
    return run_client(client_cmd("run", job, "--base-url", server.base_url), timeout_s=timeout_s)


def revoke(result: BenchResult, quick: bool) -> None:
    """The key is revoked after N answers: every 200 kept, and the rerun after the fix pays none twice."""
    tries = 5 if quick else 20
    rows = make_reviews(OUT / "failures-600.parquet", 600)
    for n in (20, 500):
        kept_all, paid_twice, sent, stopped_s, codes = 0, 0, [], [], set()
        for _ in range(tries):
            name = f"failures-revoke-{n}"
            clean_job(name)
            job = _job(name, rows)
            port = free_port()  # the rerun's server on the same address: the ledger keys answers by endpoint
            with Server(extra=["--revoke-key-after", str(n)], port=port) as server:
                first = _run(name, job, server)
                stats = server.stats()
            kept = _ledger_ok(name)
            kept_all += kept == stats["answered_ok"] == n
            sent.append(stats["received"])
            stopped_s.append(first.wall_s)
            codes.add(first.returncode)
            with Server(port=port) as fixed:
                again = _run(name, job, fixed)
                paid_twice += fixed.stats()["received"] - (600 - kept) if again.returncode == 0 else 600
        result.add(
            f"key revoked after {n} answers: tries where the 200s = the answers in the ledger",
            f"{kept_all}/{tries} (exit codes {sorted(codes)}; requests the server received: median "
            f"{statistics.median(sent):.0f}; stopped after {statistics.median(stopped_s):.2f} s)",
            f"{tries}/{tries}",
            kept_all == tries,
        )
        result.add(
            f"key revoked after {n}: answers paid twice by the rerun after the fix (all tries)",
            str(paid_twice),
            "0",
            paid_twice == 0,
        )


def provider_down(result: BenchResult, quick: bool) -> None:
    """Every request fails: probed, not hammered; rows pending; gives up after outage_wait_s with exit 6."""
    rows = make_reviews(OUT / "failures-300.parquet", 300)
    wait = 20.0 if quick else 60.0
    cases: list[tuple[str, list[str], float]] = [
        ("every request 500", ["--fail-status", "500"], wait),
        ("a 200 login page (HTML)", ["--fail-status", "200", "--fail-body", "html"], wait),
        ("a 200 without choices", ["--fail-status", "200", "--fail-body", "no_choices"], wait),
    ]
    if not quick:
        cases.insert(0, ("every request 503, default outage_wait_s (600 s)", ["--fail-status", "503"], 600.0))
    for label, extra, outage in cases:
        name = "failures-down"
        clean_job(name)
        job = _job(name, rows, outage_wait_s=None if outage == 600.0 else outage)
        with Server(extra=extra) as server:
            run = _run(name, job, server)
            received = server.stats()["received"]
        pending = run.summary.get("rows_pending", 0)
        budget = 20 if outage >= 600 else 12
        ok = run.returncode == 6 and received <= budget and pending == 300
        result.add(
            f"{label}: requests sent / seconds to give up / exit",
            f"{received} requests, {run.wall_s:.1f} s, exit {run.returncode}, {pending} rows pending",
            f"≤ {budget} requests, exit 6, 300 pending",
            ok,
        )
    name = "failures-refused"
    clean_job(name)
    job = _job(name, rows, outage_wait_s=wait)
    port = free_port()
    run = run_client(client_cmd("run", job, "--base-url", f"http://127.0.0.1:{port}/v1"), timeout_s=1800)
    result.add(
        "nothing listening: requests that reached a server / seconds to give up / exit",
        f"{run.summary.get('requests_sent')} sent, {run.wall_s:.1f} s, exit {run.returncode}",
        "0 sent, exit 6",
        run.returncode == 6 and run.summary.get("requests_sent") == 0,
    )


def recover(result: BenchResult, quick: bool) -> None:
    """Down for 90 s, then back: every row ok in the same run, nothing paid twice."""
    down_s = 20.0 if quick else 90.0
    rows = make_reviews(OUT / "failures-300.parquet", 300)
    name = "failures-recover"
    clean_job(name)
    job = _job(name, rows)
    with Server(extra=["--fail-status", "503", "--fail-for-s", str(down_s)]) as server:
        run = _run(name, job, server)
        stats = server.stats()
    failed = stats["by_status"].get("503", 0)
    ok = run.returncode == 0 and run.summary.get("rows_ok") == 300 and stats["duplicates"] == 0
    result.add(
        f"down for {down_s:g} s, then back: exit / rows ok / paid twice / 503s while down / wall",
        f"exit {run.returncode}, {run.summary.get('rows_ok')} ok, {stats['duplicates']} twice, {failed} requests "
        f"failed, {run.wall_s:.1f} s",
        "exit 0, 300 ok, 0 twice",
        ok,
    )


def setup(result: BenchResult, quick: bool) -> None:
    """The same refusal for every row (a gateway's wrong-key answer): stopped after a handful of requests."""
    rows = make_reviews(OUT / "failures-300.parquet", 300)
    for label, extra in (
        ("400 'No connected db.' for every row", ["--fail-status", "400", "--fail-body", "No connected db."]),
        ("401 wrong key", ["--fail-status", "401", "--fail-body", "Incorrect API key provided."]),
    ):
        name = "failures-setup"
        clean_job(name)
        job = _job(name, rows)
        with Server(extra=extra) as server:
            run = _run(name, job, server)
            received = server.stats()["received"]
        result.add(
            f"{label}: requests sent / exit / wall",
            f"{received} requests, exit {run.returncode}, {run.wall_s:.2f} s",
            "≤ 5 requests, exit 4",
            received <= 5 and run.returncode == 4,
        )


def limits(result: BenchResult, quick: bool) -> None:
    """Limits the run is not told of, or told wrongly: refused share and wall against the ideal."""
    scale = 4 if quick else 1
    cases: list[tuple[str, int, float | None, list[str], float, float]] = [
        # label, rows, job rpm, server options, server rpm, max refused share
        ("job 12,000 RPM, server 3,000 (1-s windows, headers)", 600 // scale, 12_000, ["--rpm", "3000"], 3000, 0.02),
        (
            "server 600 per minute window, no headers, no Retry-After",
            1200 // scale,
            None,
            ["--rpm", str(600 // scale), "--burst-s", "60", "--no-ratelimit-headers", "--no-retry-after"],
            600 / scale,
            0.05,
        ),
        (
            "server 600 per minute window, headers say 100,000, no Retry-After (a gateway)",
            1200 // scale,
            None,
            ["--rpm", str(600 // scale), "--burst-s", "60", "--advertised-rpm", "100000", "--no-retry-after"],
            600 / scale,
            0.05,
        ),
    ]
    for label, n, job_rpm, extra, server_rpm, share in cases:
        rows = make_reviews(OUT / f"failures-{n}.parquet", n)
        name = "failures-limits"
        clean_job(name)
        job = _job(name, rows, rpm=job_rpm)
        with Server(extra=extra) as server:
            run = _run(name, job, server)
            stats = server.stats()
        refused = stats["by_status"].get("429", 0)
        burst = 60.0 if "--burst-s" in extra else 1.0
        ideal = max(0.0, (n - server_rpm / 60.0 * burst) / (server_rpm / 60.0))
        result.add(
            f"{label}: 429s / requests, all ok, wall (ideal {ideal:.1f} s)",
            f"{refused}/{stats['received']} ({refused / max(1, stats['received']):.1%}), "
            f"{run.summary.get('rows_ok')} ok, {run.wall_s:.1f} s",
            f"≤ {share:.0%} refused, {n} ok",
            refused <= share * stats["received"] and run.summary.get("rows_ok") == n,
        )


CASES = {"revoke": revoke, "down": provider_down, "recover": recover, "setup": setup, "limits": limits}


def run(quick: bool, chosen: set[str] | None = None) -> BenchResult:
    result = BenchResult(NAME, TITLE)
    result.settings["job"] = "default [limits] except the rpm or outage_wait_s a case names; preset vllm, --base-url"
    for key, case in CASES.items():
        if chosen is not None and key not in chosen:
            continue
        print(f"   -- {key}", flush=True)
        try:
            case(result, quick)
        except Exception as exc:  # one case failing must not hide the others
            result.add(key, f"harness error: {exc!r}"[:300], "", False)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cases", default="", help=f"comma-separated: {','.join(CASES)} (default: all)")
    args = ap.parse_args()
    chosen = {c.strip() for c in args.cases.split(",") if c.strip()} or None
    import run_all

    started = time.monotonic()
    result = run(args.quick, chosen)
    for f in result.figures:
        met = "" if f.met is None else ("  [ok]" if f.met else "  [MISSED]")
        print(f"   {f.label}: {f.value}{f'  (target {f.target})' if f.target else ''}{met}", flush=True)
    output = OUT / f"RESULTS.failures{'.quick' if args.quick else ''}.md"
    with contextlib.suppress(Exception):
        for f in result.figures:
            f.command = "python benchmarks/bench_failures.py" + (f" --cases {args.cases}" if args.cases else "")
    output.write_text(run_all.render([result], args.quick, sys.argv[1:], time.monotonic() - started))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
