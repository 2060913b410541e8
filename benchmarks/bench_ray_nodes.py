"""9. A Ray run that loses a worker node: a head and two worker nodes on this machine, one removed mid-run.

The cluster is Ray's own ``ray.cluster_utils.Cluster``: three raylets, each with its own CPUs, every
process on 127.0.0.1. The client is a real ``seedbatch run --executor ray --ray-address ...`` (the
driver, in its own process, on the head node); its two shards run one per worker node. When the
server has answered a quarter of the rows, the node running shard 0 is killed outright (raylet and
workers, not graceful). Ray retries that shard on the other node, where it resumes from its shard
ledger.

Measured at the server (``/_stats``): paid twice = answers given minus distinct request bodies. Rows ok
are read from the output the run wrote. Wall time is the client's, Ray start-up of the cluster not
included (the driver only connects). Needs the ``ray`` extra.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from common import (
    OUT,
    ROOT,
    BenchResult,
    Server,
    clean_job,
    client_cmd,
    make_reviews,
    require_ok,
    run_client,
    write_job,
)

NAME = "ray_nodes"
TITLE = "A Ray run that loses one of its two worker nodes"

LATENCY_MS = 200.0
JITTER_MS = 50.0
WORKERS = 2
CONCURRENCY = 32  # per shard: what a lost node can have in flight
CPUS_PER_NODE = 2


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(_parent(int(entry.name)), []).append(int(entry.name))
            except (OSError, IndexError):
                continue
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _listening_hosts(pids: set[int]) -> list[str]:
    """Local addresses of the TCP sockets ``pids`` listen on (``ss -ltnp``)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [
        line.split()[3].rsplit(":", 1)[0]
        for line in out.splitlines()
        if {int(p) for p in re.findall(r"pid=(\d+)", line)} & pids
    ]


def _loopback(host: str) -> bool:
    return host.strip("[]").removeprefix("::ffff:").startswith("127.") or host.strip("[]") == "::1"


def run(quick: bool) -> BenchResult:
    if importlib.util.find_spec("ray") is None:
        raise RuntimeError("the ray_nodes benchmark needs Ray: pip install 'seedbatch[ray]' (or make test-ray once)")
    # Ray rewrites 127.0.0.1 to the LAN address unless the cluster is declared local-only; read at import.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    from ray.cluster_utils import Cluster

    from pipeline.job.spec import load_spec

    rows = 1000 if quick else 3000
    result = BenchResult(NAME, TITLE)
    result.settings.update(
        {
            "rows": f"{rows:,}",
            "server": f"seedbatch serve, latency {LATENCY_MS:.0f} ± {JITTER_MS:.0f} ms, no limits",
            "client": f"--executor ray --workers {WORKERS}, concurrency {CONCURRENCY} per shard",
            "cluster": f"ray.cluster_utils.Cluster: head (0 CPUs) + 2 worker nodes ({CPUS_PER_NODE} CPUs each), "
            "all on 127.0.0.1, dashboard off",
            "fault": "the node running shard 0 removed (not graceful) once the server answered 25% of the rows",
        }
    )
    name = "bench_ray_nodes"
    data = make_reviews(OUT / f"reviews_{rows}.parquet", rows)
    clean_job(name)
    job = write_job(name, data, concurrency=CONCURRENCY, max_tokens=64)
    shards_dir = load_spec(job).shards_dir.resolve()
    local = {"node_ip_address": "127.0.0.1"}
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={**local, "num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(**local, num_cpus=CPUS_PER_NODE)
        cluster.wait_for_nodes()
        startup_s = time.monotonic() - t0
        with Server(latency_ms=LATENCY_MS, jitter_ms=JITTER_MS) as server:
            fault: dict[str, Any] = {}

            def remove_a_node() -> None:
                """Wait for a quarter of the rows, then kill the node whose raylet started shard 0's worker."""
                pid_file = shards_dir / "0000.pid"
                while "error" not in fault:
                    stats = server.stats()
                    if stats["answered_ok"] >= rows // 4 and pid_file.exists() and pid_file.read_text():
                        raylet = _parent(int(pid_file.read_text()))
                        node = next(
                            n for n in cluster.worker_nodes if n.all_processes["raylet"][0].process.pid == raylet
                        )
                        hosts = _listening_hosts(_descendants(os.getpid()))
                        fault.update(
                            answered=int(stats["answered_ok"]),
                            in_flight=int(stats["received"]) - sum(int(n) for n in stats["by_status"].values()),
                            sockets=len(hosts),
                            off_loopback=[h for h in hosts if not _loopback(h)],
                        )
                        cluster.remove_node(node, allow_graceful=False)
                        return
                    time.sleep(0.02)

            killer = threading.Thread(target=remove_a_node, daemon=True)
            killer.start()
            cmd = client_cmd(
                "run",
                job,
                "--base-url",
                server.base_url,
                "--executor",
                "ray",
                "--ray-address",
                cluster.address,
                "--workers",
                str(WORKERS),
            )
            client = run_client(cmd, timeout_s=900)
            fault.setdefault("error", "run ended")
            killer.join(timeout=60)
            stats = server.stats()
        require_ok(client, "ray_nodes")
    finally:
        cluster.shutdown()
    import polars as pl

    out = pl.read_parquet(OUT / f"{name}.parquet", columns=["status"])
    ok = out.filter(pl.col("status") == "ok").height
    twice = int(stats["answered_ok"]) - len(stats["ok_by_body_hash"])
    result.commands += [f"server: {server.command}", f"client: {client.command}"]
    if "answered" not in fault:
        result.add("worker node removed mid-run", "no: the run ended before a quarter of the rows", "yes", False)
        return result
    result.add(
        "rows ok after the run (no rerun)",
        f"{ok:,} / {rows:,}",
        "all",
        ok == rows,
    )
    result.add(
        "answers paid twice (server: answered − distinct requests)",
        f"{twice} (node removed at {fault['answered']:,} answered; {fault['in_flight']} in flight at the "
        "server across both nodes)",
        f"≤ {CONCURRENCY} (the lost node's shard concurrency)",
        twice <= CONCURRENCY,
    )
    result.add(
        "client wall time, rows/s",
        f"{client.wall_s:.1f} s, {rows / client.wall_s:,.0f} rows/s",
    )
    result.add(
        "listening sockets of the cluster's processes off loopback (ss -ltnp, at the removal)",
        f"{len(fault['off_loopback'])} of {fault['sockets']}",
        "0",
        not fault["off_loopback"],
    )
    result.notes.append(
        f"Cluster start-up (3 raylets) took {startup_s:.1f} s and is not in the wall time. With one node lost, "
        "the retried shard shares the surviving node's CPUs with the other shard."
    )
    return result


if __name__ == "__main__":
    import sys

    for figure in run("--quick" in sys.argv).figures:
        print(f"{figure.label}: {figure.value}  (target {figure.target or '-'}, met {figure.met})")
