"""6. Cost of a crash: SIGKILL the client at random moments, resume, count what was paid for twice.

Per kill, from the server's counters and the ledger (read after the kill):

* in flight at the kill: requests the server had received but not answered when the client died
  (the server cancels those handlers, so they are never answered or billed);
* lost answers: answered by the server during that run but not committed to the ledger. Each is sent
  again by the next run, so it becomes exactly one duplicate at the server (``ok_by_body_hash`` > 1).

Target: lost answers (re-sent) ≤ the in-flight count at that kill. At the end the server's total
duplicates must equal the sum of the lost answers, and every row must be ok.
"""

from __future__ import annotations

import random
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from common import (
    OUT,
    BenchResult,
    Server,
    clean_job,
    client_cmd,
    make_reviews,
    require_ok,
    run_client,
    shell,
    write_job,
)

NAME = "crash"
TITLE = "Cost of a crash (SIGKILL mid-run, then resume)"

LATENCY_MS = 200.0
JITTER_MS = 50.0
CONCURRENCY = 64


@dataclass
class Kill:
    after_s: float
    in_flight: int
    answered: int
    committed: int
    lost: int


def ledger_rows(path: Path) -> int:
    if not path.exists():
        return 0
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT count(*) FROM answers WHERE status = 'ok'").fetchone()[0])
    except sqlite3.OperationalError:  # killed before the table was created
        return 0
    finally:
        db.close()


def run(quick: bool) -> BenchResult:
    rows = 2000 if quick else 3000
    kills_wanted = 5 if quick else 6
    delay = (0.2, 0.8) if quick else (0.3, 1.2)
    rng = random.Random(20261123)
    result = BenchResult(NAME, TITLE)
    result.settings.update(
        {
            "rows": f"{rows:,}",
            "server": f"seedbatch serve, latency {LATENCY_MS:.0f} ± {JITTER_MS:.0f} ms, no limits",
            "client": f"concurrency {CONCURRENCY}, no rpm/tpm",
            "kills": f"{kills_wanted} × SIGKILL, each {delay[0]}-{delay[1]} s (uniform, seeded) after the server "
            "sees the run's first request; then one run to completion",
        }
    )
    name = "bench_crash"
    data = make_reviews(OUT / f"reviews_{rows}.parquet", rows)
    clean_job(name)
    job = write_job(name, data, concurrency=CONCURRENCY, max_tokens=64)
    ledger = OUT / f"{name}.parquet.ledger.sqlite"
    kills: list[Kill] = []
    with Server(latency_ms=LATENCY_MS, jitter_ms=JITTER_MS) as server:
        cmd = client_cmd("run", job, "--base-url", server.base_url)
        result.commands += [f"server: {server.command}", f"client: {shell(cmd)} (killed, then resumed)"]
        final = None
        for _ in range(kills_wanted * 3):
            if len(kills) >= kills_wanted:
                break
            before = server.stats()
            committed_before = ledger_rows(ledger)
            wait = rng.uniform(*delay)
            state: dict[str, float] = {}

            def kill_when(before: dict[str, int] = before, state: dict[str, float] = state, wait: float = wait) -> bool:
                now = time.monotonic()
                if "first" not in state:
                    if now - state.get("polled", 0.0) < 0.05:
                        return False
                    state["polled"] = now
                    if server.stats()["received"] > before["received"]:
                        state["first"] = now
                    return False
                return now - state["first"] >= wait

            r = run_client(cmd, kill_when=kill_when)
            if not r.killed:  # finished before the kill: that was the last run
                require_ok(r, "crash")
                final = r
                break
            time.sleep(0.3)  # let the server see the closed connections and cancel their handlers
            after = server.stats()
            answered = after["answered_ok"] - before["answered_ok"]
            received = after["received"] - before["received"]
            committed = ledger_rows(ledger) - committed_before
            kills.append(Kill(wait, received - answered, answered, committed, answered - committed))
        if final is None:
            final = run_client(cmd)
            require_ok(final, "crash (final resume)")
        stats = server.stats()
    duplicates = int(stats["duplicates"])
    lost_total = sum(k.lost for k in kills)
    worst = [k for k in kills if k.lost > k.in_flight]
    result.add(
        "kills made",
        f"{len(kills)}",
        f"≥ {kills_wanted}",
        len(kills) >= kills_wanted,
    )
    for i, k in enumerate(kills, 1):
        result.add(
            f"kill {i} at +{k.after_s:.2f} s: re-sent (answered, not committed) vs in flight at kill",
            f"{k.lost} re-sent vs {k.in_flight} in flight ({k.answered} answered, {k.committed} committed)",
            "re-sent ≤ in flight",
            k.lost <= k.in_flight,
        )
    result.add(
        "all kills: requests re-sent per kill vs in flight per kill (mean)",
        f"{lost_total / max(len(kills), 1):.1f} vs {sum(k.in_flight for k in kills) / max(len(kills), 1):.1f}",
        "re-sent ≤ in flight at every kill",
        not worst and bool(kills),
    )
    result.add(
        "duplicates at the server after the final resume (ok answers for a body hash seen before)",
        f"{duplicates:,} (sum of lost answers: {lost_total:,})",
        "= sum of lost answers",
        duplicates == lost_total,
    )
    ok = int(final.summary.get("rows_ok", 0))
    result.add("rows ok after the final resume", f"{ok:,} of {rows:,}", f"{rows:,}", ok == rows)
    return result
