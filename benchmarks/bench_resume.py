"""5. Resume cost: the memory benchmark's job, fully answered in the ledger, run again and ``status``-ed.

The output is up to date (the memory benchmark's last run built it from this input, job and ledger):
the rerun must say so, send nothing (checked at the server) and leave the output as it is;
``seedbatch status`` counts from the up-to-date output. Both are timed as whole processes (interpreter
start to exit). The one-row-changed rerun is in the scale benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path

import bench_memory
from common import OUT, BenchResult, Server, client_cmd, require_ok, run_client

NAME = "resume"
TITLE = "Resume cost (everything already answered)"

TARGET_S = 1.0
STATUS_TARGET_S = 10.0


def _complete(job: Path, total: int) -> bool:
    """Whether the last run of ``job`` ended with every row ok (its manifest says so)."""
    manifest = OUT / f"{job.stem}.parquet.manifest.json"
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return bool(data.get("rows_by_status") == {"ok": total})


def run(quick: bool) -> BenchResult:
    total, _ = bench_memory.sizes(quick)
    result = BenchResult(NAME, TITLE)
    job = bench_memory.job_path(quick)
    ledger = OUT / f"{job.stem}.parquet.ledger.sqlite"
    result.settings.update(
        {
            "job": f"{job.name} ({total:,} rows, the memory benchmark's job)",
            "ledger": f"{ledger.name}, {ledger.stat().st_size / 1e6:,.0f} MB" if ledger.exists() else "built first",
        }
    )
    with Server(port=bench_memory.PORT) as server:
        if not ledger.exists():
            result.notes.append("the ledger was missing: the memory benchmark's runs were made first")
            bench_memory.answer_all(quick, server, fresh=True)
        elif not _complete(job, total):
            result.notes.append("the ledger was incomplete: the whole job was run once more first")
            bench_memory.answer_all(quick, server, fresh=False)
        server.reset()
        rerun = run_client(client_cmd("run", job, "--base-url", server.base_url))
        require_ok(rerun, "resume rerun")
        received = int(server.stats()["received"])
        # The same --base-url as the runs: answers are keyed by endpoint, and without it status counted
        # the job's default endpoint (every row pending, as earlier RESULTS.md notes show).
        status = run_client(client_cmd("status", job, "--base-url", server.base_url))
    require_ok(status, "status")
    result.commands += [f"client: {rerun.command}", f"client: {status.command}"]
    result.settings["ledger"] = f"{ledger.name}, {ledger.stat().st_size / 1e6:,.0f} MB"
    said = '"event": "up_to_date"' in rerun.stderr_tail
    result.add(
        "rerun wall time (up to date: sends nothing, rewrites nothing)",
        f"{rerun.wall_s:.2f} s ({rerun.cpu_s:.2f} s CPU, peak RSS {rerun.maxrss_mb:,.0f} MB)",
        f"< {TARGET_S:.0f} s",
        rerun.wall_s < TARGET_S,
    )
    result.add(
        "requests the rerun sent (server received); said up to date",
        f"{received:,}; {said}",
        "0; True",
        received == 0 and said,
    )
    result.add(
        "`seedbatch status` wall time",
        f"{status.wall_s:.1f} s ({status.cpu_s:.1f} s CPU, peak RSS {status.maxrss_mb:,.0f} MB)",
        f"< {STATUS_TARGET_S:.0f} s",
        status.wall_s < STATUS_TARGET_S,
    )
    tail = [line for line in (OUT / "client.stderr").read_text().splitlines() if line.startswith("rows")]
    if tail:
        result.notes.append(f"status said: {tail[0].strip()}")
    return result
