"""``run_job``: the only place the stages are wired together.

Data flows one way: spec → reader → prompts → (ledger: already answered?) → scheduler(client →
validator) → ledger → writer → summary. Every check that can fail on bad input runs in ``prepare``,
before the lock, the ledger or the network are touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import polars as pl

from pipeline import __version__, media, schema_types
from pipeline.client import Client
from pipeline.costs import Price, fill_cost, price_for, worst_case_usd
from pipeline.errors import FatalAPIError, RetryableError, RowError, SeedbatchError, SpecError
from pipeline.ledger import JobLock, Ledger
from pipeline.prompts import Renderer, with_changes
from pipeline.reader import (
    ROW_NUMBER,
    InputTable,
    RowRange,
    Selection,
    check_id_column,
    open_input,
    read_frames,
    read_rows,
    selected_rows,
)
from pipeline.records import NOT_SENT, Outcome, Request, RunSummary, Usage, needs_sending
from pipeline.scheduler import Pacer, RetryPolicy, call_with_retries, run_all
from pipeline.spec import JobSpec
from pipeline.validator import Judgement, judge, parse_document
from pipeline.writer import OUTPUT_COLUMNS, check_output_path, write_output

EXIT_OK = 0
EXIT_ROWS_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_PARTIAL = 3
EXIT_FATAL_API = 4
EXIT_LOCKED = 5
EXIT_INTERNAL = 70

#: Seconds between progress checks (answers are committed every event-loop turn, not on this clock).
FLUSH_INTERVAL_S = 0.2


@dataclass
class Prepared:
    """Everything checked and built before the first request."""

    spec: JobSpec
    table: InputTable
    selection: Selection
    renderer: Renderer
    schema: dict[str, Any] | None
    price: Price | None
    api_key: str | None
    rows: int
    row_range: RowRange | None = None
    """Only these positions among the selected rows (one shard of a Ray run); None: all of them."""


def load_schema(spec: JobSpec) -> dict[str, Any] | None:
    raw = spec.output.schema_
    if raw is None:
        return None
    if isinstance(raw, dict):
        source, schema = "output.schema (inline)", raw
    else:
        source = str(raw)
        try:
            schema = json.loads(Path(raw).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SpecError(f"{raw}: schema file not found (output.schema)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SpecError(f"{raw}: schema is not valid JSON ({exc})") from None
    schema_types.check_schema(schema, strict=spec.output.strict and spec.output.format == "json_schema", source=source)
    return schema


def resolve_api_key(spec: JobSpec) -> str | None:
    """The key from ``api_key_file`` or the environment; never from a flag, never logged."""
    if spec.endpoint.api_key_file is not None:
        path = spec.endpoint.api_key_file
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SpecError(f"{path}: cannot read endpoint.api_key_file ({exc.strerror})") from None
        if not key:
            raise SpecError(f"{path}: endpoint.api_key_file is empty")
        return key
    key = os.environ.get(spec.api_key_env, "").strip()
    if not key and spec.key_required:
        raise SpecError(
            f"no API key: set the environment variable {spec.api_key_env} (or endpoint.api_key_file in the job)"
        )
    return key or None


def prepare(spec: JobSpec, selection: Selection | None = None, *, need_key: bool = True) -> Prepared:
    """Every check that needs no network: input, columns, templates, schema, output path, key."""
    selection = selection or Selection()
    schema = load_schema(spec)
    table = open_input(spec.job.input)
    builder = media.MediaBuilder(spec.media) if (spec.media.image_columns or spec.media.video_columns) else None
    renderer = Renderer(spec, schema, builder.cells if builder else None)
    renderer.check_columns(table.columns, f"{spec.source or 'job'}: prompt")
    if spec.job.id_column and spec.job.id_column not in table.columns:
        raise SpecError(f"{spec.source or 'job'}: job.id_column {spec.job.id_column!r} is not an input column")
    if spec.job.id_column and not spec.job.dedupe:
        check_id_column(table, spec.job.id_column)
    if builder is not None:
        builder.check_columns(table.columns, str(spec.source or "job"))
        if spec.media.strict_inputs:  # stat + 16 bytes per file, so a bad file stops the run before any request
            size = min(spec.job.chunk_rows, media.CHUNK_ROWS)
            builder.require_clean(read_rows(table, selection, size, builder.column_names, spec.job.id_column))
    check_distinct_files(spec)
    check_output_path(spec.job.output, table.columns)
    if schema is not None:
        schema_types.check_column_clash(
            schema,
            spec.output.column_prefix,
            [*table.columns, *OUTPUT_COLUMNS],
            str(spec.output.schema_) if not isinstance(spec.output.schema_, dict) else "output.schema",
        )
    price = price_for(spec)
    if spec.limits.max_cost_usd is not None and price is None:
        raise SpecError(
            f"{spec.source or 'job'}: limits.max_cost_usd needs a price for {spec.model.name!r}; add [pricing]"
        )
    if spec.endpoint.preset != "local" and not spec.base_url:
        raise SpecError(f"{spec.source or 'job'}: endpoint.base_url is not set")
    api_key = resolve_api_key(spec) if need_key and spec.base_url is not None else None
    p = Prepared(spec, table, selection, renderer, schema, price, api_key, selected_rows(table, selection))
    read_all(p)
    return p


def read_all(p: Prepared) -> None:
    """Parse every selected row once before anything is paid for (bounded memory: one chunk at a time).

    A malformed line at row 4,000 of 5,000 then stops the run before its first request, with the file
    and line, instead of after 4,000 paid answers. Rendering cannot fail on a parsed row: every per-row
    problem (bad media, empty placeholders, over the context) is that row's outcome, not the run's.
    """
    columns = [*p.renderer.fields, *p.spec.media.image_columns, *p.spec.media.video_columns]
    if p.spec.job.id_column:
        columns.append(p.spec.job.id_column)
    for _ in read_frames(p.table, p.selection, p.spec.job.chunk_rows, list(dict.fromkeys(columns))):
        pass


def check_distinct_files(spec: JobSpec) -> None:
    """The output, ledger and manifest must not be the input (or each other): writing one would destroy it."""
    written = {"job.output": spec.job.output, "the ledger": spec.ledger_path, "the manifest": spec.manifest_path}
    input_path = spec.job.input.resolve()
    for what, path in written.items():
        if path.resolve() == input_path:
            raise SpecError(f"{path}: {what} is the input file; writing it would destroy the input: change job.output")
    if spec.ledger_path.resolve() == spec.job.output.resolve():
        raise SpecError(f"{spec.ledger_path}: job.ledger is job.output; give the ledger its own file")


def iter_requests(p: Prepared, chunk_rows: int | None = None) -> Iterator[list[Request]]:
    columns = [*p.renderer.fields, *p.spec.media.image_columns, *p.spec.media.video_columns]
    size = chunk_rows or p.spec.job.chunk_rows
    if p.spec.media.image_columns or p.spec.media.video_columns:
        size = min(size, media.CHUNK_ROWS)  # media bytes live in the request bodies: keep few chunks of them
    for rows in read_rows(p.table, p.selection, size, columns, p.spec.job.id_column, p.row_range):
        yield [p.renderer.render(r) for r in rows]


def new_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


class _BudgetExhausted(Exception):
    pass


@dataclass
class Budget:
    """Spent plus the worst case of attempts in flight never exceeds ``limit``."""

    limit: float | None
    spent: float = 0.0
    reserved: float = 0.0

    def reserve(self, amount: float) -> bool:
        if self.limit is not None and self.spent + self.reserved + amount > self.limit:
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, actual: float) -> None:
        self.reserved = max(0.0, self.reserved - reserved)
        self.spent += actual


@dataclass
class RunOptions:
    selection: Selection = field(default_factory=Selection)
    retry_errors: bool = False
    fresh: bool = False
    grace_s: float = 30.0
    install_signal_handlers: bool = True
    progress: Callable[[RunSummary, int], None] | None = None
    progress_interval_s: float = 1.0
    transport: httpx.AsyncBaseTransport | None = None


def make_pacer(spec: JobSpec) -> Pacer:
    """The job's pacer: its own buckets, or a bucket shared with other processes (``limits.shared_limiter``)."""
    limits = spec.limits
    if limits.shared_limiter is None:
        return Pacer(limits.rpm, limits.tpm)
    from pipeline.shared_limits import SqliteQuota, default_limits_file

    path = limits.shared_limiter_file or default_limits_file()
    return Pacer(limits.rpm, limits.tpm, quota=SqliteQuota(limits.shared_limiter, path, limits.rpm, limits.tpm))


def budget_stop_reason(spent: float, limit: float | None) -> str:
    return f"budget: stopped issuing at ${spent:.4f} spent of limits.max_cost_usd = {limit}"


class _Run:
    """State of one run (or of one shard of a Ray run); methods are the pieces ``run_job`` composes.

    ``pacer`` and ``budget`` are injected by the Ray executor so that every shard takes from the
    cluster's one RPM/TPM and one budget instead of holding its own.
    """

    def __init__(
        self,
        p: Prepared,
        ledger: Ledger,
        options: RunOptions,
        summary: RunSummary,
        *,
        pacer: Pacer | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.p = p
        self.spec = p.spec
        self.ledger = ledger
        self.options = options
        self.summary = summary
        self.pacer = pacer or make_pacer(p.spec)
        self.budget = budget or Budget(p.spec.limits.max_cost_usd)
        self.policy = RetryPolicy(max_attempts=p.spec.limits.max_attempts, backoff_max_s=p.spec.limits.backoff_max_s)
        self.check = schema_types.compile_validator(p.schema) if p.schema is not None else None
        self.expects_json = p.spec.output.format != "text"
        self.open_hashes: set[str] = set()  # in flight or answered but not yet committed
        self.committed_since: set[str] = set()  # committed since the current chunk's ledger snapshot
        self.uncommitted: list[Outcome] = []
        self._flush_scheduled = False
        self.resending: set[str] = set()  # hashes re-sent over an earlier failed answer in the ledger
        self.in_flight = 0
        self.stop = asyncio.Event()
        self.budget_hit = False
        self.client: Client | None = None

    # Producer side ---------------------------------------------------------------------------------
    def todo(self) -> Iterator[Request]:
        retry = self.options.retry_errors
        for chunk in iter_requests(self.p):
            if self.stop.is_set():
                return
            self.ledger.map_rows([(r.row_index, r.request_hash) for r in chunk])
            # ``known`` is a snapshot: answers committed after it are remembered in ``committed_since``
            # until the next snapshot, so an identical row later in the chunk is never sent again.
            self.committed_since.clear()
            hashes = [r.request_hash for r in chunk]
            known = self.ledger.known(hashes, run_id=self.summary.run_id if self.options.fresh else None)
            for req in chunk:
                self.summary.null_cells += req.null_cells
                h = req.request_hash
                prior = known.get(h)
                if req.not_sent is None and not needs_sending(prior, retry_errors=retry):
                    self.summary.rows_from_ledger += 1
                elif h in self.open_hashes or h in self.committed_since:
                    self.summary.rows_deduplicated += 1
                else:
                    self.open_hashes.add(h)
                    if prior is not None and req.not_sent is None and prior[0] not in NOT_SENT:
                        self.resending.add(h)  # its earlier attempts' usage is added to this answer's
                    yield req

    # One request, all its attempts -------------------------------------------------------------------
    async def answer(self, req: Request) -> Outcome | None:
        assert self.client is not None
        client = self.client
        out = self.spec.output
        prior = self.ledger.get(req.request_hash) if req.request_hash in self.resending else None
        self.resending.discard(req.request_hash)
        usage = prior.usage if prior else Usage()
        attempts = prior.attempts if prior else 0
        unconfirmed = prior.unconfirmed_attempts if prior else 0
        if req.not_sent is not None:
            ns = req.not_sent
            if ns.status == "error":
                self._count_error(ns.error_kind, ns.error)
            return Outcome(req.request_hash, ns.status, error=ns.error, error_kind=ns.error_kind)
        body, max_tokens = req.body, req.max_tokens
        invalid_left, truncated_left = out.invalid_retries, out.truncated_retries
        last: Judgement | None = None
        latency: float | None = None

        async def attempt() -> Any:
            nonlocal attempts, unconfirmed
            worst = worst_case_usd(req.est_prompt_tokens, max_tokens, self.p.price)
            if self.stop.is_set():
                raise _BudgetExhausted
            if not self.budget.reserve(worst):
                self.budget_hit = True
                self.stop.set()
                raise _BudgetExhausted
            await self.pacer.acquire(self.pacer.estimate(req.est_prompt_tokens, max_tokens))
            attempts += 1
            self.summary.requests_sent += 1
            self.in_flight += 1
            try:
                reply = await client.send(body)
            except RetryableError as exc:
                self.budget.settle(worst, 0.0)
                unconfirmed += exc.sent
                if exc.status_code == 429:
                    self.summary.http_429 += 1
                    self.pacer.on_rate_limited()
                self._count_error(exc.kind, str(exc))
                raise
            except BaseException:
                self.budget.settle(worst, 0.0)
                raise
            finally:
                self.in_flight -= 1
            return reply, worst

        def on_retry(exc: BaseException, wait: float) -> None:
            self.summary.retries += 1

        while True:
            try:
                reply, worst = await call_with_retries(attempt, self.policy, on_retry=on_retry)
            except _BudgetExhausted:
                if last is None:
                    return None
                return self._outcome(req, last, usage, attempts, unconfirmed, latency)
            except (RetryableError, RowError) as exc:
                if isinstance(exc, RowError):
                    self._count_error(exc.kind, str(exc))
                return Outcome(
                    req.request_hash,
                    "error",
                    error=f"{exc} (attempt {attempts}/{self.policy.max_attempts})"
                    if isinstance(exc, RetryableError)
                    else str(exc),
                    error_kind=exc.kind,
                    usage=usage,
                    attempts=attempts,
                    unconfirmed_attempts=unconfirmed,
                    latency_ms=latency,
                )
            latency = reply.latency_ms
            last = judge(reply, expects_json=self.expects_json, check=self.check)
            paid = fill_cost(last.usage, self.p.price)
            usage = usage + paid
            self._count_paid(paid)
            self.budget.settle(worst, paid.usd_spent or 0.0)
            self.pacer.observe(req.est_prompt_tokens, max_tokens, paid.prompt_tokens, paid.completion_tokens)
            over_budget = out.row_token_budget is not None and (usage.total_tokens or 0) >= out.row_token_budget
            if last.status == "invalid_output" and invalid_left > 0 and not over_budget:
                invalid_left -= 1
                self._count_error("invalid_output", last.error or "")
                if out.reask_with_error and last.content is not None:
                    body = with_changes(req.body, max_tokens=max_tokens, reask=(last.content, last.error or ""))
                continue
            if (
                last.status == "truncated"
                and truncated_left > 0
                and max_tokens < out.max_tokens_cap
                and not over_budget
            ):
                truncated_left -= 1
                max_tokens = min(out.max_tokens_cap, max_tokens * 2)
                body = with_changes(body, max_tokens=max_tokens)
                continue
            if last.status != "ok":
                self._count_error(last.status, last.error or "")
            return self._outcome(req, last, usage, attempts, unconfirmed, latency)

    def _outcome(
        self, req: Request, j: Judgement, usage: Usage, attempts: int, unconfirmed: int, latency: float | None
    ) -> Outcome:
        error = j.error
        if error and attempts > 1:
            error = f"{error} (attempt {attempts})"
        return Outcome(
            req.request_hash,
            j.status,
            j.content,
            j.reasoning_content,
            j.finish_reason,
            j.model,
            j.response_id,
            usage,
            error,
            j.status if j.status != "ok" else None,
            attempts,
            unconfirmed,
            latency,
        )

    def _count_paid(self, paid: Usage) -> None:
        """The summary counts what this run paid, as it arrives (a retried row's earlier cost is not in it)."""
        s = self.summary
        s.prompt_tokens += paid.prompt_tokens or 0
        s.completion_tokens += paid.completion_tokens or 0
        s.usd_spent += paid.usd_spent or 0.0
        s.credits_used += paid.credits_used or 0.0

    def _count_error(self, kind: str, message: str) -> None:
        by_kind = self.summary.errors_by_kind
        by_kind[kind] = by_kind.get(kind, 0) + 1
        self.summary.error_examples.setdefault(kind, message[:300])

    # Consumer side ---------------------------------------------------------------------------------
    def record(self, req: Request, outcome: Outcome | None) -> None:
        if outcome is None:  # never sent (budget or stop): stays pending
            self.open_hashes.discard(req.request_hash)
            return
        self.ledger.add(outcome, self.summary.run_id)
        self.uncommitted.append(outcome)
        # Group commit once per event-loop turn: every answer that arrived in this turn is committed
        # before the loop waits on the network again, so a SIGKILL loses only answers still in flight.
        # (A commit per answer cost ~10% CPU at 2,000 answers/s; one per turn is the same guarantee.)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if not self.uncommitted:
            return
        self.ledger.flush()
        s = self.summary
        for o in self.uncommitted:
            self.open_hashes.discard(o.request_hash)
            self.committed_since.add(o.request_hash)
            s.rows_by_status[o.status] = s.rows_by_status.get(o.status, 0) + 1
        self.uncommitted = []

    async def flusher(self) -> None:
        last_progress = 0.0
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            self.flush()
            now = time.monotonic()
            if self.options.progress and now - last_progress >= self.options.progress_interval_s:
                last_progress = now
                self.options.progress(self.summary, self.in_flight)

    async def main(self, base_url: str) -> None:
        spec = self.spec
        self.client = Client(
            base_url,
            self.p.api_key,
            key_source=f"the key in ${spec.api_key_env}"
            if not spec.endpoint.api_key_file
            else f"the key in {spec.endpoint.api_key_file}",
            timeout_s=spec.limits.request_timeout_s,
            connect_timeout_s=spec.limits.connect_timeout_s,
            max_connections=spec.limits.concurrency,
            transport=self.options.transport,
        )
        loop = asyncio.get_running_loop()
        main_task = asyncio.current_task()
        signals = 0

        def on_signal(signum: int) -> None:
            nonlocal signals
            signals += 1
            self.summary.interrupted = True
            self.summary.stop_reason = f"signal {signal.Signals(signum).name}"
            self.stop.set()
            if signals == 1:
                loop.call_later(self.options.grace_s, lambda: main_task.cancel() if main_task else None)
            else:  # second signal: commit what arrived and leave now
                self.flush()
                os._exit(EXIT_PARTIAL)

        if self.options.install_signal_handlers:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_signal, sig)
        flusher = asyncio.create_task(self.flusher())
        try:
            await run_all(self.todo(), self.answer, self.record, concurrency=spec.limits.concurrency)
        except asyncio.CancelledError:
            if not self.summary.interrupted:
                raise
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            self.flush()
            if self.options.install_signal_handlers:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
            await self.client.aclose()


def _typed_columns(p: Prepared) -> Callable[[Sequence[str | None], Sequence[str]], list[pl.Series]] | None:
    if p.schema is None:
        return None
    schema, prefix = p.schema, p.spec.output.column_prefix

    def build(contents: Sequence[str | None], statuses: Sequence[str]) -> list[pl.Series]:
        docs = [
            parse_document(c) if s == "ok" and c is not None else None for c, s in zip(contents, statuses, strict=True)
        ]
        return schema_types.typed_columns(docs, schema, prefix)

    return build


def write_manifest(spec: JobSpec, summary: RunSummary) -> Path:
    path = spec.manifest_path
    data = {
        "seedbatch_version": __version__,
        "job": summary.job,
        "job_file": str(spec.source) if spec.source else None,
        "job_file_sha256": spec.source_sha256,
        "run_id": summary.run_id,
        "started_at": dt.datetime.fromtimestamp(summary.started_at, dt.UTC).isoformat(),
        "ended_at": dt.datetime.fromtimestamp(summary.ended_at, dt.UTC).isoformat(),
        "wall_s": round(summary.wall_s, 3),
        "exit_code": summary.exit_code,
        "output": summary.output_path,
        "ledger": str(spec.ledger_path),
        **{
            k: v
            for k, v in asdict(summary).items()
            if k not in ("job", "run_id", "started_at", "ended_at", "exit_code", "output_path", "manifest_path")
        },
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    os.replace(tmp, path)
    return path


def exit_code_for(summary: RunSummary) -> int:
    if summary.stop_reason and summary.stop_reason.startswith("fatal"):
        return EXIT_FATAL_API
    if summary.rows_by_status.get("pending"):
        return EXIT_PARTIAL
    if any(n for status, n in summary.rows_by_status.items() if status not in ("ok", "skipped")):
        return EXIT_ROWS_FAILED
    return EXIT_OK


#: Sends what the ledger lacks for ``Prepared``: commits every answer to ``Ledger`` and maps every
#: selected row to its request hash there (for the output), counts into ``RunSummary``, sets its
#: ``stop_reason`` on a fatal error or the budget. The last argument is the endpoint's base URL.
Executor = Callable[[Prepared, Ledger, RunOptions, RunSummary, str], None]


def execute_local(p: Prepared, ledger: Ledger, options: RunOptions, summary: RunSummary, url: str) -> None:
    """The default executor: this process, one event loop, ``limits.concurrency`` workers."""
    run = _Run(p, ledger, options, summary)
    try:
        asyncio.run(run.main(url))
    except FatalAPIError as exc:
        summary.stop_reason = f"fatal: {exc}"
        return
    if run.budget_hit:
        summary.stop_reason = budget_stop_reason(run.budget.spent, run.budget.limit)


def executor_for(spec: JobSpec) -> Executor:
    """``executor.kind``'s executor; Ray is imported only when asked for (it is an optional extra)."""
    if spec.executor.kind == "ray":
        from pipeline.ray_executor import execute_ray, require_ray

        require_ray(spec)
        return execute_ray
    return execute_local


def run_job(spec: JobSpec, options: RunOptions | None = None) -> RunSummary:
    """Run a job to completion (or to a clean stop) and return what happened.

    Raises ``SpecError``/``InputError`` before anything is sent, ``LockedError`` when another run holds
    the job. A ``FatalAPIError`` mid-run is caught: the summary says so, output and manifest are written.
    """
    options = options or RunOptions()
    p = prepare(spec, options.selection)
    execute = executor_for(spec)
    summary = RunSummary(job=spec.name, run_id=new_run_id(), rows_total=p.rows, started_at=time.time())
    with JobLock(spec.lock_path):
        ledger = Ledger(spec.ledger_path, spec.endpoint_key)
        if spec.shards_dir.exists():  # a Ray run died before merging its shards: their answers are paid for
            from pipeline.ray_executor import merge_leftover_shards

            merge_leftover_shards(spec.shards_dir, ledger)
        ledger.start_run(summary.run_id, spec.name, summary.started_at)
        server = None
        failure: int | None = None
        try:
            url = spec.base_url
            if url is None:  # preset "local" without a base_url: the built-in server, on this machine only
                from pipeline.localapi import LocalAPI, ServerConfig

                server = LocalAPI(ServerConfig(latency_ms=spec.endpoint.local_latency_ms))
                url = server.start()
            execute(p, ledger, options, summary, url)
            counts = write_output(
                spec.job.output,
                read_frames(p.table, p.selection, spec.job.chunk_rows),
                ROW_NUMBER,
                ledger.answers_for_rows,
                typed=_typed_columns(p),
            )
            summary.output_path = str(spec.job.output)
            if spec.job.run_output:
                fresh = ledger.run_answers(summary.run_id)
                run_path = Path(spec.job.run_output.format(date=dt.date.today().isoformat(), run_id=summary.run_id))
                run_path.parent.mkdir(parents=True, exist_ok=True)
                write_output(
                    run_path,
                    read_frames(p.table, p.selection, spec.job.chunk_rows),
                    ROW_NUMBER,
                    ledger.answers_for_rows,
                    typed=_typed_columns(p),
                    keep=lambda h: h in fresh,
                )
            summary.rows_by_status = counts
        except SeedbatchError as exc:
            failure = exc.exit_code  # the manifest and `status` must say what the process exits with
            raise
        except BaseException:
            failure = EXIT_INTERNAL
            raise
        finally:
            if server is not None:
                server.stop()
            summary.ended_at = time.time()
            summary.exit_code = failure if failure is not None else exit_code_for(summary)
            with contextlib.suppress(Exception):
                summary.manifest_path = str(write_manifest(spec, summary))
            ledger.end_run(summary.run_id, summary.ended_at, summary.exit_code, orjson.dumps(asdict(summary)).decode())
            ledger.close()
    return summary
