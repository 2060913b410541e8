"""9. Scale: plan, run, reruns and status at 1M and 10M rows (``SEEDBATCH_BENCH_10M=0``: 1M only).

Each step is its own client process against ``seedbatch serve`` (latency 0, own process); wall time is
process start to exit, peak RSS the child's own (``benchmarks/measured.py``).

- plan on a fresh ledger, then run (every request sent), then a rerun with nothing changed (up to
  date: must say so), then ``status``, then a rerun after ONE input row's text changed (one request),
  then ``status`` again.
- 1M tier (always): the memory benchmark's 1M-review generator, 1M distinct requests.
- 10M tier (skipped with ``SEEDBATCH_BENCH_10M=0``, alone with ``=only``): the 1M input tiled ten
  times with the same review ids, so 10M rows ask 1M distinct requests, each ten times (90% of the rows
  are duplicates the run answers from the first). Each row is named by its own ``row_id``
  (``<review_id>-t<tile>``, the job's id_column): ids must be unique, while the prompt's review ids
  repeat. Sending 10M distinct requests at ~2,000/s would take ~80 min on this machine; the tiled input
  runs every per-row path (read, render, hash, row map, output) at 10M rows in ~1/10 of that. Its rows/s
  are rows handled per second, not requests per second.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from common import OUT, BenchResult, ClientRun, Server, clean_job, client_cmd, make_reviews, rel, run_client, write_job

NAME = "scale"
TITLE = "Scale: plan, run, reruns and status at 1M (and 10M) rows"

RSS_TARGET_MB = 500.0
UP_TO_DATE_TARGET_S = 1.0
CHANGED_ROW_TARGET_S = 10.0
STATUS_TARGET_S = 10.0
#: rows/s at 10M over rows/s at 1M at or above this: time linear in rows.
LINEAR_RATIO = 0.8
HIGH_RPM = 10_000_000.0
HIGH_TPM = 10_000_000_000.0
CONCURRENCY = 256


def tiers(quick: bool) -> list[int]:
    """1M and 10M; with ``SEEDBATCH_BENCH_10M=0`` 1M alone, with ``=only`` 10M alone (after a ``make bench``
    that measured 1M: the linearity figure then compares two runs, and says so)."""
    if quick:
        return [50_000]
    tier_10m = os.environ.get("SEEDBATCH_BENCH_10M", "1")
    if tier_10m == "only":
        return [10_000_000]
    return [1_000_000] if tier_10m == "0" else [1_000_000, 10_000_000]


def base_input(quick: bool) -> Path:
    n = 50_000 if quick else 1_000_000
    return make_reviews(OUT / f"big_reviews_{n}.parquet", n, seed=20261123)


#: The id column of the tiled input: one per row, where ``review_id`` repeats once per tile.
TILED_ID = "row_id"


def tiled_input(base: Path, times: int) -> Path:
    """``base`` repeated ``times`` times with a ``row_id`` per row, written batch by batch (the harness stays
    small too)."""
    rows = pq.ParquetFile(base).metadata.num_rows
    path = OUT / f"big_reviews_{rows * times}_tiled_{TILED_ID}.parquet"
    if path.exists() and path.stat().st_mtime > base.stat().st_mtime:
        return path
    tmp = path.with_name(path.name + ".tmp")
    source = pq.ParquetFile(base)
    kind = source.schema_arrow.field("review_id").type
    schema = source.schema_arrow.append(pa.field(TILED_ID, kind))
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for tile in range(times):
            for batch in source.iter_batches(batch_size=100_000):
                kind = batch.column("review_id").type
                ids = pc.binary_join_element_wise(
                    batch.column("review_id"), pa.scalar(f"-t{tile}", kind), pa.scalar("", kind)
                )
                writer.write_batch(batch.append_column(TILED_ID, ids))
    os.replace(tmp, path)
    return path


def change_one_row(data: Path, row: int) -> None:
    """Rewrite ``data`` with the text of row ``row`` changed (a new request for that row only)."""
    tmp = data.with_name(data.name + ".edit")
    source = pq.ParquetFile(data)
    start = 0
    with pq.ParquetWriter(tmp, source.schema_arrow, compression="zstd") as writer:
        for batch in source.iter_batches(batch_size=100_000):
            out = batch
            if start <= row < start + batch.num_rows:
                texts = batch.column("text").to_pylist()
                texts[row - start] = f"{texts[row - start] or ''} (edited for the scale benchmark)"
                i = batch.schema.get_field_index("text")
                out = batch.set_column(i, "text", pa.array(texts, type=batch.schema.field("text").type))
            writer.write_batch(out)
            start += batch.num_rows
    os.replace(tmp, data)


def _rss(r: ClientRun) -> str:
    return f"{r.maxrss_mb:,.0f} MB"


def _step(result: BenchResult, label: str, r: ClientRun, rows: int, target_s: float | None = None) -> None:
    value = f"{r.wall_s:,.1f} s wall ({rows / r.wall_s:,.0f} rows/s), {r.cpu_s:,.1f} s CPU, peak RSS {_rss(r)}"
    if r.returncode != 0:
        value += f", exit {r.returncode}: {r.stderr_tail.splitlines()[-1] if r.stderr_tail else ''}"
    if target_s is None:
        result.add(label, value)
    else:
        result.add(label, value, f"≤ {target_s:g} s", r.returncode == 0 and r.wall_s <= target_s)


def run_tier(result: BenchResult, rows: int, data: Path, quick: bool) -> dict[str, float]:
    """Every step at one size; returns rows/s of each step for the linearity figure."""
    tag = f"{rows // 1_000_000}M" if rows >= 1_000_000 else f"{rows // 1000}k"
    name = f"bench_scale_{tag}"
    work = OUT / f"{name}_input.parquet"
    work.write_bytes(data.read_bytes())  # a copy: the changed-row step edits it
    id_column = TILED_ID if TILED_ID in pq.ParquetFile(data).schema_arrow.names else "review_id"
    job = write_job(name, work, rpm=HIGH_RPM, tpm=HIGH_TPM, concurrency=CONCURRENCY, max_tokens=64, id_column=id_column)
    clean_job(name)
    rates: dict[str, float] = {}
    peaks: list[float] = []
    with Server() as server:
        url = ["--base-url", server.base_url]
        steps: list[tuple[str, list[str], float | None]] = [
            ("plan (fresh ledger)", client_cmd("plan", job, *url), None),
            ("run (every request sent)", client_cmd("run", job, *url), None),
            ("rerun, nothing changed (up to date)", client_cmd("run", job, *url), UP_TO_DATE_TARGET_S),
            ("status (output up to date)", client_cmd("status", job, *url), STATUS_TARGET_S),
            # The 10 s is for 1M rows; at 10M its target is time linear in rows (see run()).
            (
                "rerun after one input row changed",
                client_cmd("run", job, *url),
                CHANGED_ROW_TARGET_S if rows <= 1_000_000 else None,
            ),
            ("status after that rerun", client_cmd("status", job, *url), STATUS_TARGET_S),
        ]
        for label, cmd, target in steps:
            if label.startswith("rerun after one"):
                change_one_row(work, rows // 2)
            server.reset()
            r = run_client(cmd)
            sent = int(server.stats()["received"])
            _step(result, f"{tag}: {label}", r, rows, target)
            peaks.append(r.maxrss_mb)
            rates[label] = rows / r.wall_s
            if label.startswith("rerun, nothing"):
                said = '"event": "up_to_date"' in r.stderr_tail
                result.add(
                    f"{tag}: up-to-date rerun said so, requests sent",
                    f"{said}; {sent:,}",
                    "True; 0",
                    said and sent == 0,
                )
            if label.startswith("rerun after one"):
                result.add(f"{tag}: requests sent after one row changed", f"{sent:,}", "1", sent == 1)
            if label.startswith("run "):
                distinct = int(r.summary.get("requests_sent", 0))
                result.add(f"{tag}: requests sent by the run (rows {rows:,})", f"{sent:,} received; {distinct:,} sent")
        result.commands.append(f"server: {server.command}")
    result.add(
        f"{tag}: peak RSS, highest of every step",
        f"{max(peaks):,.0f} MB",
        f"≤ {RSS_TARGET_MB:.0f} MB",
        max(peaks) <= RSS_TARGET_MB,
    )
    result.commands += [f"client: {rel(job)} steps: plan, run, run, status, run (after the edit), status"]
    out = OUT / f"{name}.parquet"
    if out.exists():
        ok = pc.sum(pc.equal(pq.read_table(out, columns=["status"]).column("status"), "ok")).as_py()
        result.add(f"{tag}: rows ok in the final output", f"{ok:,} of {rows:,}", f"{rows:,}", ok == rows)
    return rates


def run(quick: bool) -> BenchResult:
    result = BenchResult(NAME, TITLE)
    base = base_input(quick)
    sizes = tiers(quick)
    result.settings.update(
        {
            "input": f"{rel(base)} (the memory benchmark's generator); 10M: it tiled 10× (1M distinct requests)",
            "server": "seedbatch serve, latency 0, no limits (own process)",
            "client": f"rpm {HIGH_RPM:,.0f}, tpm {HIGH_TPM:,.0f} (never binding), concurrency {CONCURRENCY}",
            "tiers": ", ".join(f"{n:,}" for n in sizes)
            + ("" if len(sizes) > 1 or quick else " (10M skipped: SEEDBATCH_BENCH_10M=0)"),
        }
    )
    rates: dict[int, dict[str, float]] = {}
    for rows in sizes:
        data = (
            base
            if rows == pq.ParquetFile(base).metadata.num_rows
            else tiled_input(base, rows // pq.ParquetFile(base).metadata.num_rows)
        )
        rates[rows] = run_tier(result, rows, data, quick)
    if len(sizes) > 1:
        small, big = rates[sizes[0]], rates[sizes[-1]]
        steps = (
            "plan (fresh ledger)",
            "run (every request sent)",
            "rerun after one input row changed",
            "status (output up to date)",
        )
        for step in steps:
            ratio = big[step] / small[step]
            result.add(
                f"time linear in rows: {step}, rows/s at 10M ÷ rows/s at 1M",
                f"{ratio:.2f}",
                f"≥ {LINEAR_RATIO}",
                ratio >= LINEAR_RATIO if step != "status (output up to date)" else None,
            )
    elif sizes == [1_000_000]:
        result.notes.append("10M tier not run (SEEDBATCH_BENCH_10M=0): no linearity figure in this run")
    else:
        result.notes.append("10M tier alone (SEEDBATCH_BENCH_10M=only): compare its rows/s with a 1M run's")
    result.notes.append(
        "the 10M tier's run sends 1M distinct requests for 10M rows (each request asked by 10 rows); "
        "its rows/s are rows handled, not requests sent"
    )
    return result
