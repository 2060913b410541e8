"""``executor.kind = "ray"``: one job on a Ray cluster, sharded by request hash, one limit for the cluster.

The driver (``run_job``) does what it does for a local run (prepare, lock, main ledger, output); only the
sending is different (``execute_ray``):

- Requests are split into ``executor.workers`` shards by their request hash (``shard_of``), so identical
  rows land in the same shard and are paid once for the whole cluster, as in a local run. Each shard is
  one Ray task (``run_shard``) running the same ``Dispatch`` as a local run, so pacing, retries,
  validation and the ledger discipline are one code path. A shard renders every selected row to learn
  which requests are its own: rendering a row costs less than shipping it, so no list of rows crosses
  the cluster.
  Shards are spread over the nodes (``SPREAD``).
- Each shard commits to its own SQLite file, ``<ledger>.shards/<k>.sqlite`` (one writer per file, no
  lock contention across nodes), and counts answers already in the main ledger as known. It also keeps
  the shard's row → request-hash map, so the driver never renders requests itself.
- Every shard's ``Pacer`` takes from one ``ClusterLimits`` actor (RPM, TPM) and every shard's budget
  leases from it (``ray_limits``), so the job's limits hold for the cluster, not per worker. The actor
  lives on the driver's node: losing another node loses no limit state.
- A task killed mid-shard (its worker or its whole node) is retried by Ray (``max_retries``) on a live
  node and resumes from its shard ledger: only answers in flight when it died are paid again (answers
  are committed in the loop turn they arrive). The run then ends with every row answered.
- When the tasks end, the driver merges the shard ledgers into the main ledger and deletes them; a
  driver that dies first leaves them for the next run of the job (local or Ray) to merge.

Ray is imported only inside functions: a local run never needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.errors import SpecError
from pipeline.executors.local import Dispatch
from pipeline.executors.ray_limits import ClusterLimits, LeasedBudget, RayQuota
from pipeline.options import RunOptions
from pipeline.records import RunTally, Selection, StopReason
from pipeline.requests.prepare import Prepared, prepare
from pipeline.state.ledger import Ledger
from pipeline.state.shard_ledger import ShardLedger

INSTALL_HINT = "pip install 'seedbatch[ray]'"
#: Ray retries of a shard whose worker died (killed, OOM, node lost); each resumes from the shard ledger.
SHARD_RETRIES = 3
#: Seconds between a shard's heartbeats to the limits actor (progress up, stop requests down).
HEARTBEAT_S = 0.5


def require_ray(spec: Any) -> None:
    """A one-line ``SpecError`` (exit 2, nothing sent) when the job asks for Ray and it is not installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SpecError(f"{spec.source or 'job'}: executor.kind = 'ray' needs Ray: {INSTALL_HINT}") from None


def shard_count(rows: int, workers: int) -> int:
    """``executor.workers`` shards, fewer when there are fewer rows (an empty shard starts a task for nothing)."""
    return max(1, min(workers, rows))


def shard_of(request_hash: str, shards: int) -> int:
    """The shard that sends ``request_hash``: identical requests, wherever their rows are, share one shard.

    The hash is a uniform hex digest, so its leading 64 bits spread requests evenly over the shards.
    """
    return int(request_hash[:16], 16) % shards


def _holds(index: int, shards: int, request_hash: str) -> bool:
    return shard_of(request_hash, shards) == index


# ---------------------------------------------------------------------------------------- one shard


@dataclass
class ShardTask:
    """What a shard needs; plain data, so Ray can ship it (the API key is not in it)."""

    spec: Any  # JobSpec
    selection: Selection
    shards: int
    index: int
    run_id: str
    base_url: str
    cwd: str
    retry_errors: bool = False
    fresh: bool = False


def shard_path(shards_dir: Path, index: int) -> Path:
    return shards_dir / f"{index:04d}.sqlite"


def _progress_fields(s: RunTally, in_flight: int) -> dict[str, Any]:
    return {
        "rows_by_status": dict(s.rows_by_status),
        "rows_from_ledger": s.rows_from_ledger,
        "rows_deduplicated": s.rows_deduplicated,
        "requests_sent": s.requests_sent,
        "retries": s.retries,
        "http_429": s.http_429,
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "usd_spent": s.usd_spent,
        "errors_by_kind": dict(s.errors_by_kind),
        "in_flight": in_flight,
    }


def run_shard(task: ShardTask, limits: Any) -> RunTally:
    """One Ray task: send what the main and shard ledgers lack among the requests of shard ``task.index``.

    The worker resolves the API key itself (its environment or ``endpoint.api_key_file``), so the key
    never travels through Ray. Relative paths in the job mean what they mean on the driver: the shard
    runs in the driver's directory when it exists here.
    """
    with contextlib.suppress(OSError):
        os.chdir(task.cwd)
    spec = task.spec
    shards_dir = spec.shards_dir.resolve()
    shards_dir.mkdir(parents=True, exist_ok=True)
    (shards_dir / f"{task.index:04d}.pid").write_text(str(os.getpid()))
    # The driver parsed every row before any shard started: no second pre-pass per shard.
    p = replace(prepare(spec, task.selection, read_everything=False), holds=partial(_holds, task.index, task.shards))
    summary = RunTally(job=spec.name, run_id=task.run_id, rows_total=p.rows, started_at=time.time())
    options = RunOptions(selection=task.selection, retry_errors=task.retry_errors, fresh=task.fresh)
    ledger = ShardLedger(shard_path(shards_dir, task.index), spec.ledger_path.resolve(), spec.endpoint_key)
    budget = LeasedBudget(limits, spec.limits.max_cost_usd) if spec.limits.max_cost_usd is not None else None
    quota = RayQuota(limits) if (spec.limits.rpm or spec.limits.tpm) else None
    dispatch = Dispatch(p, ledger, options, summary, quota=quota, budget=budget)

    attempt = os.urandom(4).hex()

    async def heartbeats() -> None:
        while True:
            if await limits.heartbeat.remote(task.index, _progress_fields(summary, dispatch.in_flight), attempt):
                dispatch.stop.set()
            await asyncio.sleep(HEARTBEAT_S)

    async def main() -> None:
        beat = asyncio.create_task(heartbeats())
        try:
            await dispatch.run(task.base_url)
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    try:
        asyncio.run(main())  # a fatal answer is recorded in ``summary`` by ``Dispatch.run``, not raised
    finally:
        ledger.close()
        if isinstance(budget, LeasedBudget):
            limits.give_back.remote(budget.unused())
    summary.ended_at = time.time()
    limits.heartbeat.remote(task.index, _progress_fields(summary, 0), attempt, True)
    return summary


# ---------------------------------------------------------------------------------------- the driver


#: The counters of what an attempt sent and paid; a lost attempt's rows are counted by the attempt that
#: redid them, its sends and spend only by its own heartbeats.
_SPENT = ("requests_sent", "retries", "http_429", "prompt_tokens", "completion_tokens", "usd_spent")


def _add_into(total: RunTally, part: dict[str, Any]) -> None:
    """Add one shard's counters (``_progress_fields`` or a whole summary as a dict) into ``total``."""
    for key in (
        "rows_from_ledger",
        "rows_deduplicated",
        "requests_sent",
        "retries",
        "http_429",
        "null_cells",
        "prompt_tokens",
        "completion_tokens",
        "usd_spent",
        "credits_used",
    ):
        value = part.get(key)
        if value is not None:
            setattr(total, key, getattr(total, key) + value)
    for kind, n in (part.get("errors_by_kind") or {}).items():
        total.errors_by_kind[kind] = total.errors_by_kind.get(kind, 0) + n
    for kind, text in (part.get("error_examples") or {}).items():
        total.error_examples.setdefault(kind, text)
    for status, n in (part.get("rows_by_status") or {}).items():
        total.rows_by_status[status] = total.rows_by_status.get(status, 0) + n


async def execute_ray(p: Prepared, ledger: Ledger, options: RunOptions, summary: RunTally, url: str) -> None:
    """``executors.Executor`` for Ray: the driver loop (blocking Ray calls) runs in a thread."""
    await asyncio.to_thread(_drive, p, ledger, options, summary, url)


#: Seconds a cluster address may take to accept a connection before the run gives up on it.
CONNECT_TIMEOUT_S = 10.0


def check_reachable(address: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in bounded time, in one line, when a cluster address takes no connection.

    ``ray.init`` on an address it cannot reach retries for minutes, printing warnings, and does not
    return to see a stop request: a TCP connect first settles it. ``None``, ``auto`` and ``local`` name
    no remote address and are left to Ray.
    """
    if not address or address in ("auto", "local"):
        return
    host_port = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise SpecError(f"executor.address {address!r}: give host:port (e.g. 127.0.0.1:6379) or ray://host:10001")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc)).lower()
        raise SpecError(
            f"executor.address {address!r}: no Ray cluster answers there ({reason} within {timeout_s:g} s); "
            "check the address (--ray-address) or start one with `ray start --head`"
        ) from None


def _drive(p: Prepared, ledger: Ledger, options: RunOptions, summary: RunTally, url: str) -> None:
    """Shards as tasks, then their ledgers merged into ``ledger``; a stop request reaches every shard."""
    spec = p.spec
    check_reachable(spec.executor.address)
    import ray

    started_ray = False
    if not ray.is_initialized():
        ray.init(address=spec.executor.address, log_to_driver=True, include_dashboard=False)
        started_ray = True
    shards_dir = spec.shards_dir.resolve()
    shutil.rmtree(shards_dir, ignore_errors=True)  # run_job merged any leftovers before
    shards_dir.mkdir(parents=True, exist_ok=True)
    limits = _limits_actor(spec)
    shards = shard_count(p.rows, spec.executor.workers)
    shard_remote = ray.remote(max_retries=SHARD_RETRIES, retry_exceptions=False, scheduling_strategy="SPREAD")(
        run_shard
    )
    cwd = os.getcwd()
    refs = {
        shard_remote.remote(
            ShardTask(spec, p.selection, shards, k, summary.run_id, url, cwd, options.retry_errors, options.fresh),
            limits,
        ): k
        for k in range(shards)
    }
    results: dict[int, RunTally] = {}
    failures: list[str] = []
    try:
        _wait_for_shards(refs, limits, options, summary, results, failures)
    finally:
        _count_shards(summary, results, limits)
        for k in range(shards):
            path = shard_path(shards_dir, k)
            if path.exists():
                ledger.merge(path, rows=True)
        shutil.rmtree(shards_dir, ignore_errors=True)
        ray.kill(limits)
        if started_ray:
            ray.shutdown()
    _why_stopped(summary, results, failures, spec.limits.max_cost_usd)


def _limits_actor(spec: Any) -> Any:
    """The cluster's one ``ClusterLimits``, on the driver's node: a lost worker node must not take the
    cluster's buckets and budget with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return (
        ray.remote(num_cpus=0)(ClusterLimits)
        .options(max_concurrency=1, scheduling_strategy=here)
        .remote(spec.limits.rpm, spec.limits.tpm, spec.limits.max_cost_usd)
    )


def _wait_for_shards(
    refs: dict[Any, int],
    limits: Any,
    options: RunOptions,
    summary: RunTally,
    results: dict[int, RunTally],
    failures: list[str],
) -> None:
    """Collect each shard's summary as it ends (into ``results``, or its error into ``failures``).

    A shard stopped by a fatal answer or the budget, or a stop request here, asks every shard to stop;
    shards still running ``options.grace_s`` later (or at once on a hard stop) are cancelled.
    """
    import ray

    stop_deadline: float | None = None
    hard_stop = False

    def on_stop(hard: bool) -> None:
        nonlocal hard_stop
        hard_stop = hard_stop or hard

    unlisten = options.stop.listen(on_stop)
    last_progress = 0.0
    try:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=0.25)
            for ref in done:
                try:
                    result: RunTally = ray.get(ref)
                except Exception as exc:  # a shard that failed for good: its rows stay pending
                    failures.append(f"shard {refs[ref]}: {str(exc).strip().splitlines()[-1]}")
                    continue
                results[refs[ref]] = result
                if result.stopped_by and stop_deadline is None:  # fatal or budget: stop the others
                    limits.request_stop.remote()
                    stop_deadline = time.monotonic() + options.grace_s
            if options.stop.requested and stop_deadline is None:
                summary.interrupted = True
                summary.stop(StopReason.SIGNAL, options.stop.reason or "stop requested")
                limits.request_stop.remote()
                stop_deadline = time.monotonic() + options.grace_s
            if pending and stop_deadline is not None and (time.monotonic() > stop_deadline or hard_stop):
                for ref in pending:
                    ray.cancel(ref, force=True)
                ray.wait(pending, num_returns=len(pending), timeout=10)
                return
            now = time.monotonic()
            if options.progress and now - last_progress >= options.progress_interval_s:
                last_progress = now
                _report(options, summary, ray.get(limits.all_progress.remote()))
    finally:
        unlisten()


def _count_shards(summary: RunTally, results: dict[int, RunTally], limits: Any) -> None:
    """Add the finished shards' counters, and what lost attempts sent as far as their heartbeats told."""
    import ray

    for part in results.values():
        _add_into(summary, part.as_dict())
    with contextlib.suppress(Exception):
        for lost in ray.get(limits.lost_attempts.remote(), timeout=10):
            _add_into(summary, {key: lost.get(key) for key in _SPENT})
    summary.rows_by_status = {}  # counted again from the output by run_job


def _why_stopped(
    summary: RunTally, results: dict[int, RunTally], failures: list[str], max_cost_usd: float | None
) -> None:
    """The run's stop reason from its shards': a fatal answer, then the budget, then failed shards."""
    stopped = [r for r in results.values() if r.stopped_by]
    fatal = next((r for r in stopped if r.stopped_by is StopReason.FATAL), None)
    if fatal is not None:
        summary.stopped_by = None  # a fatal answer outranks a signal: it is why every row would fail
        summary.stop(StopReason.FATAL, fatal.stop_reason or "fatal")
    elif any(r.stopped_by is StopReason.BUDGET for r in stopped):
        summary.stop(
            StopReason.BUDGET,
            f"budget: stopped issuing at ${summary.usd_spent:.4f} spent of limits.max_cost_usd = {max_cost_usd}",
        )
    elif failures:
        summary.stop(StopReason.SHARDS_FAILED, f"ray: {len(failures)} shard(s) failed: {failures[0]}")
    if failures:
        summary.errors_by_kind["shard_failed"] = len(failures)
        summary.error_examples.setdefault("shard_failed", failures[0][:300])


def _report(options: RunOptions, summary: RunTally, progress: dict[int, dict[str, Any]]) -> None:
    """The live panel / progress lines from the shards' last heartbeats."""
    assert options.progress is not None
    view = RunTally(
        job=summary.job, run_id=summary.run_id, rows_total=summary.rows_total, started_at=summary.started_at
    )
    for fields in progress.values():
        _add_into(view, fields)
    options.progress(view.snapshot(), sum(int(f.get("in_flight", 0)) for f in progress.values()))
