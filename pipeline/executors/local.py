"""The default executor: this process, one event loop, closed-loop pacing.

``Dispatch`` is the run's bookkeeping around ``attempts.Attempts``: which requests still need sending
(the ledger, duplicates within the run), committing each answer in the event-loop turn it arrived in,
progress, and stopping. A Ray shard runs the same ``Dispatch`` with the cluster's quota and budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from functools import partial

from pipeline.answers.validator import judge
from pipeline.job import schema_types
from pipeline.job.spec import JobSpec
from pipeline.options import RunOptions
from pipeline.records import NOT_SENT, Outcome, Reply, Request, RunTally, StopReason, count_error, needs_sending
from pipeline.requests.prepare import Prepared, iter_requests
from pipeline.sending.attempts import AnswerPolicy, Attempts, Send
from pipeline.sending.breaker import Circuit, SameRefusal
from pipeline.sending.buckets import Pacer, Quota
from pipeline.sending.budget import Budget
from pipeline.sending.client import FEW_REQUESTS, Client
from pipeline.sending.pacing import Pacing
from pipeline.sending.pool import run_all
from pipeline.sending.retries import RetryPolicy
from pipeline.state.ledger import Ledger

#: Seconds between progress reports and stop checks (answers are committed every loop turn, not on this).
TICK_S = 0.2
#: Rows in the first chunk sent: the first request leaves after rendering these, not ``job.chunk_rows``.
FIRST_CHUNK_ROWS = 64


def make_pacing(spec: JobSpec, quota: Quota | None = None) -> tuple[Pacer, Pacing]:
    """The job's pacer (its own buckets, or a quota shared with other processes) and its closed loop."""
    limits = spec.limits
    if quota is None and limits.shared_limiter is not None:
        from pipeline.sending.shared_limits import SqliteQuota, default_limits_file

        path = limits.shared_limiter_file or default_limits_file()
        quota = SqliteQuota(limits.shared_limiter, path, limits.rpm, limits.tpm)
    pacing = Pacing(limits.rpm, limits.tpm, ceiling=limits.concurrency, request_timeout_s=limits.request_timeout_s)
    return Pacer(limits.rpm, limits.tpm, quota=quota, control=pacing), pacing


def answer_policy(spec: JobSpec) -> AnswerPolicy:
    out, limits = spec.output, spec.limits
    return AnswerPolicy(
        retry=RetryPolicy(
            max_attempts=limits.max_attempts,
            backoff_max_s=limits.backoff_max_s,
            rate_limit_wait_s=limits.rate_limit_wait_s,
        ),
        invalid_retries=out.invalid_retries,
        reask_with_error=out.reask_with_error,
        truncated_retries=out.truncated_retries,
        max_tokens_cap=out.max_tokens_cap,
        row_token_budget=out.row_token_budget,
        streaming=spec.endpoint.stream,
    )


def streaming_send(client: Client, stall_s: float, silence: Callable[[], float]) -> Send:
    """``client.send`` streaming: a stream silent for ``stall_s`` or ``silence()``, if shorter, is stalled.

    ``silence`` is the deadline learned from whole answers (3 × their p99, at least 10 s): no healthy
    stream is silent for longer than an entire answer takes, so a hung stream is dropped as soon as a hung
    plain request would be, and one that keeps writing is never cut off. It is read again while a stream
    waits, so streams opened before the deadline was learned get it too.
    """

    def limit() -> float:
        return min(stall_s, silence())

    async def send(body: bytes, deadline_s: float | None) -> Reply:
        return await client.send(body, None, stream=True, stall_s=limit)

    return send


class Dispatch:
    """One run's sending (or one Ray shard's): what to send, what came back, when it is durable."""

    def __init__(
        self,
        p: Prepared,
        ledger: Ledger,
        options: RunOptions,
        summary: RunTally,
        *,
        quota: Quota | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.p = p
        self.spec = p.spec
        self.ledger = ledger
        self.options = options
        self.summary = summary
        self.pacer, self.pacing = make_pacing(p.spec, quota)
        self.budget = budget or Budget(p.spec.limits.max_cost_usd)
        self.stop = asyncio.Event()
        check = schema_types.compile_validator(p.schema) if p.schema is not None else None
        calls = p.tools.rules() if p.tools is not None else None
        self.judge = partial(judge, expects_json=p.spec.output.format != "text", check=check, calls=calls)
        self.open_hashes: set[str] = set()  # in flight or answered but not yet committed
        self.committed_since: set[str] = set()  # committed since the current chunk's ledger snapshot
        self.resending: set[str] = set()  # re-sent over an earlier failed answer: its usage adds up
        self.uncommitted: list[Outcome] = []
        self._flush_scheduled = False
        self._drained = False
        self.attempts: Attempts | None = None

    @property
    def in_flight(self) -> int:
        return self.attempts.in_flight if self.attempts else 0

    # What to send ----------------------------------------------------------------------------------
    def todo(self) -> Iterator[Request]:
        retry = self.options.retry_errors
        for chunk in iter_requests(self.p, first_chunk_rows=FIRST_CHUNK_ROWS):
            if self.stop.is_set():
                return
            self.ledger.map_rows([(r.row_index, r.request_hash) for r in chunk])
            # ``known`` is a snapshot: answers committed after it are remembered in ``committed_since``
            # until the next snapshot, so an identical row later in the chunk is never sent again.
            self.committed_since.clear()
            known = self.ledger.known_runs(
                [r.request_hash for r in chunk], run_id=self.summary.run_id if self.options.fresh else None
            )
            for req in chunk:
                self.summary.null_cells += req.null_cells
                h = req.request_hash
                found = known.get(h)
                prior = found[:2] if found is not None else None
                if req.not_sent is None and not needs_sending(prior, retry_errors=retry):
                    if found is not None and found[2] == self.summary.run_id:  # answered a chunk ago
                        self.summary.rows_deduplicated += 1
                    else:
                        self.summary.rows_from_ledger += 1
                elif h in self.open_hashes or h in self.committed_since:
                    self.summary.rows_deduplicated += 1
                else:
                    self.open_hashes.add(h)
                    if prior is not None and req.not_sent is None and prior[0] not in NOT_SENT:
                        self.resending.add(h)
                    yield req
        if self.attempts is not None:
            self.attempts.no_more_rows()

    async def answer(self, req: Request) -> Outcome | None:
        ns = req.not_sent
        if ns is not None:  # decided before sending: bad media, empty placeholders, over the context
            if ns.status == "error":
                count_error(self.summary, ns.error_kind, ns.error)
            return Outcome(req.request_hash, ns.status, error=ns.error, error_kind=ns.error_kind)
        assert self.attempts is not None
        prior = None
        if req.request_hash in self.resending:
            self.resending.discard(req.request_hash)
            prior = self.ledger.get(req.request_hash)
        return await self.attempts.answer(req, prior)

    # What came back --------------------------------------------------------------------------------
    def record(self, req: Request, outcome: Outcome | None) -> None:
        if outcome is None:  # never sent (budget or stop): stays pending
            self.open_hashes.discard(req.request_hash)
            return
        self._keep(outcome)

    def _keep(self, outcome: Outcome) -> None:
        self.ledger.add(outcome, self.summary.run_id)
        self.uncommitted.append(outcome)
        # Group commit once per event-loop turn: every answer that arrived in this turn is committed
        # before the loop waits on the network again, so a SIGKILL loses only answers still in flight.
        # A commit per answer would give no stronger guarantee and spend a transaction per answer, CPU a
        # fast run needs for sending.
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

    async def ticker(self) -> None:
        last_progress = 0.0
        while True:
            await asyncio.sleep(TICK_S)
            message = self.pacing.take_message()
            if message and self.options.log:
                self.options.log(message)
            now = time.monotonic()
            if self.options.progress and now - last_progress >= self.options.progress_interval_s:
                last_progress = now
                self.options.progress(self.summary.snapshot(), self.in_flight)

    # The run ---------------------------------------------------------------------------------------
    async def run(self, base_url: str) -> None:
        """Send until done or stopped; a fatal answer, an outage or the budget stops it: what arrived is
        committed and ``summary`` says why (``_say_why_stopped``)."""
        spec = self.spec
        client = Client(
            base_url,
            self.p.api_key,
            key_source=f"the key in ${spec.api_key_env}"
            if not spec.endpoint.api_key_file
            else f"the key in {spec.endpoint.api_key_file}",
            timeout_s=spec.limits.request_timeout_s,
            connect_timeout_s=spec.limits.connect_timeout_s,
            max_connections=spec.limits.concurrency,
            transport=self.options.transport,
            stall_s=spec.endpoint.stall_s,
            few_requests=self.p.rows <= FEW_REQUESTS,
        )
        self.attempts = Attempts(
            send=streaming_send(client, spec.endpoint.stall_s, self.pacing.timeout_s)
            if spec.endpoint.stream
            else client.send,
            pacer=self.pacer,
            pacing=self.pacing,
            budget=self.budget,
            judge=self.judge,
            price=self.p.price,
            policy=answer_policy(spec),
            summary=self.summary,
            stop=self.stop,
            circuit=Circuit(outage_wait_s=spec.limits.outage_wait_s),
            # A job of two rows that both get one refusal is as clear a setup error as three rows.
            same_refusal=SameRefusal(rows_needed=max(2, min(3, self.p.rows))),
        )
        loop = asyncio.get_running_loop()
        sending = asyncio.ensure_future(
            run_all(
                self.todo(),
                self.answer,
                self.record,
                # A worker per row at most: a worker beyond the row count could never have a request to send.
                concurrency=max(1, min(spec.limits.concurrency, self.p.rows)),
                limit=self.pacing.in_flight_limit,
                changes=self.pacing,
            )
        )

        def on_stop(hard: bool) -> None:  # from any thread: the CLI's signal handler, a notebook
            def apply() -> None:
                if not self.stop.is_set():
                    self.summary.interrupted = True
                    self.summary.stop(StopReason.SIGNAL, self.options.stop.reason or "stop requested")
                    self.stop.set()
                    loop.call_later(self.options.grace_s, sending.cancel)
                if hard:  # commit what arrived and abandon what is in flight
                    sending.cancel()

            loop.call_soon_threadsafe(apply)

        unlisten = self.options.stop.listen(on_stop)
        ticker = asyncio.create_task(self.ticker())
        drain = asyncio.create_task(self._drain(sending))
        try:
            await sending
        except asyncio.CancelledError:
            if not (self.summary.interrupted or self._drained):  # a caller's cancellation is the caller's
                raise
        finally:
            unlisten()
            for task in (ticker, drain):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for outcome in self.attempts.abandoned:
                self._keep(outcome)
            self.flush()
            await client.aclose()
        self._say_why_stopped()

    async def _drain(self, sending: asyncio.Future[None]) -> None:
        """Once the run stops (fatal, outage, budget, signal): no new sends; the requests in flight land
        (``options.grace_s`` at most), then what only waits (a backoff, a bucket, a held refusal) is dropped."""
        await self.stop.wait()
        assert self.attempts is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.options.grace_s):
                await self.attempts.idle.wait()
        await asyncio.sleep(0)  # the last answer's record and commit come first
        self._drained = True
        sending.cancel()

    def _say_why_stopped(self) -> None:
        assert self.attempts is not None
        spec = self.spec
        if self.attempts.fatal is not None:
            self.summary.stop(StopReason.FATAL, f"fatal: {self.attempts.fatal}")
        if self.attempts.gave_up is not None:
            self.summary.stop(StopReason.OUTAGE, self.attempts.gave_up)
        if self.attempts.budget_hit:
            self.summary.stop(
                StopReason.BUDGET,
                f"budget: stopped issuing at ${self.budget.spent:.4f} spent of limits.max_cost_usd = "
                f"{spec.limits.max_cost_usd}",
            )


async def execute_local(p: Prepared, ledger: Ledger, options: RunOptions, summary: RunTally, url: str) -> None:
    """``executors.Executor`` for this process: one event loop, up to ``limits.concurrency`` in flight.

    A fatal answer does not raise: ``Dispatch.run`` commits what arrived and records why it stopped."""
    await Dispatch(p, ledger, options, summary).run(url)
