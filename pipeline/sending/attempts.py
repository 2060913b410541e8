"""What happens to one request: its attempts, re-asks, truncation retries, budget and pacing signals.

``Attempts.answer(request)`` is the whole policy for one row, with every collaborator passed in: the
``send`` function (the HTTP client), the ``Pacer`` (rate buckets) and ``Pacing`` (the closed loop: pause
after a 429, in-flight cap, timeouts), the ``Budget``, the ``judge`` (validator) and the price. It never
touches rows, files or the ledger, so it is unit-tested with a fake ``send`` and an injected sleep.

Per attempt::

    stop requested?  → give up before sending (the row stays pending)
    circuit open?    → wait; one probe at growing intervals; open too long: stop the run (``breaker``)
    budget.reserve(worst case)  → refused: stop the run (the row stays pending)
    pacer.acquire(tokens)        waits out a 429 pause and the RPM/TPM buckets
    send(body, timeout)          timeout from the latencies seen so far (Pacing.timeout_s)
      429            → pacing signal; retried within ``rate_limit_wait_s``, never uses up an attempt
      timeout/5xx/…  → retried quickly once, then with backoff (``max_attempts``); feeds the circuit
      401/403/404    → fatal: no new sends, the row stays pending, answers in flight are kept
      400/413/422    → the row's error, unless several rows get the same refusal (a setup error: fatal;
                       ``refusal_hold`` keeps the row until that is known)
    judge(reply)     → ok | invalid_output (re-ask) | truncated (more max_tokens) | refused

Whatever stops the run, an answer that arrived is returned (a re-asked row's earlier paid answer too:
``abandoned`` holds it when the row is cancelled), so the caller commits it.

A re-ask never repeats the exact request: it carries the validation error (``reask_with_error``), and a
deterministic request (temperature 0, or a seed) that would come out identical gets a sampling step
instead, so a deterministic server cannot be paid twice for the same mistake.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.answers.costs import Price, fill_cost, worst_case_usd
from pipeline.answers.validator import Judgement
from pipeline.errors import FatalAPIError, RetryableError, RowError
from pipeline.records import Outcome, Reply, Request, RunTally, Usage, count_error
from pipeline.requests.prompts import vary_sampling, with_changes
from pipeline.sending.breaker import Circuit, SameRefusal, about_the_row
from pipeline.sending.buckets import Pacer
from pipeline.sending.budget import Budget
from pipeline.sending.client import ratelimit_of, wait_until
from pipeline.sending.pacing import Pacing
from pipeline.sending.refusal_hold import RefusalHold, first_of
from pipeline.sending.retries import RetryPolicy, call_paced

#: POST one body. The second argument is the deadline learned from observed latency (None: the ceiling):
#: a plain request must be answered within it; a streamed one (``AnswerPolicy.streaming``) must not fall
#: silent for longer than it, however long the whole answer runs.
Send = Callable[[bytes, float | None], Awaitable[Reply]]
Judge = Callable[[Reply], Judgement]


@dataclass(frozen=True, slots=True)
class AnswerPolicy:
    """The job's settings for re-asking one row (``[output]``), and its retry policy (``[limits]``)."""

    retry: RetryPolicy
    invalid_retries: int = 2
    reask_with_error: bool = True
    truncated_retries: int = 0
    max_tokens_cap: int = 16_384
    row_token_budget: int | None = None
    streaming: bool = False
    """``send`` streams: the learned deadline bounds silence between chunks, never a live stream's length."""


class _Stopped(Exception):
    """No (further) attempt may start: the run is stopping or the budget is spent."""


def _digest(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=16).digest()


@dataclass(slots=True)
class _Row:
    """One row's request as its attempts go: what was paid, tried and answered so far."""

    body: bytes
    max_tokens: int
    usage: Usage
    attempts: int
    unconfirmed: int
    invalid_left: int
    truncated_left: int
    tried: set[bytes] = field(default_factory=set)
    last: Judgement | None = None
    latency: float | None = None

    @classmethod
    def start(cls, req: Request, prior: Outcome | None, policy: AnswerPolicy) -> _Row:
        return cls(
            body=req.body,
            max_tokens=req.max_tokens,
            usage=prior.usage if prior else Usage(),
            attempts=prior.attempts if prior else 0,
            unconfirmed=prior.unconfirmed_attempts if prior else 0,
            invalid_left=policy.invalid_retries,
            truncated_left=policy.truncated_retries,
            tried={_digest(req.body)},
        )

    def next_body(self, body: bytes) -> None:
        self.body = body
        self.tried.add(_digest(body))


class Attempts:
    """The per-request policy of one run (or one Ray shard); ``in_flight`` and ``budget_hit`` are read outside."""

    def __init__(
        self,
        *,
        send: Send,
        pacer: Pacer,
        pacing: Pacing,
        budget: Budget,
        judge: Judge,
        price: Price | None,
        policy: AnswerPolicy,
        summary: RunTally,
        stop: asyncio.Event,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        circuit: Circuit | None = None,
        same_refusal: SameRefusal | None = None,
        hold_s: float = 10.0,
    ) -> None:
        self.send = send
        self.pacer = pacer
        self.pacing = pacing
        self.budget = budget
        self.judge = judge
        self.price = price
        self.policy = policy
        self.summary = summary
        self.stop = stop
        self.sleep = sleep
        self.in_flight = 0
        self.budget_hit = False
        self.circuit = circuit or Circuit()
        self.refusals = RefusalHold(same_refusal or SameRefusal(), hold_s, sleep)
        self.fatal: FatalAPIError | None = None
        """What stopped the run as fatal (a 401, the same refusal for every row); the first one."""
        self.gave_up: str | None = None
        """Set when the circuit stayed open for ``outage_wait_s``: why, in one line."""
        self.abandoned: list[Outcome] = []
        """Paid answers of rows cancelled mid-way (a re-ask in flight at a hard stop): the caller commits them."""
        self.idle = asyncio.Event()
        """Set while no request is in flight: a stopping run waits for it before dropping what only waits."""
        self.idle.set()
        self._closed = asyncio.Event()

    @property
    def hold_s(self) -> float:
        """The longest a refused row is held while it is not known whether every row gets that refusal."""
        return self.refusals.hold_s

    # -- what stops the run

    def _stop_fatal(self, exc: FatalAPIError) -> None:
        if self.fatal is None:
            self.fatal = exc
        self.stop.set()

    async def _admit(self) -> bool:
        """Wait while the circuit is open; True when this attempt is its probe. Raises ``_Stopped``."""
        circuit = self.circuit
        while circuit.is_open():
            if self.stop.is_set():
                raise _Stopped
            if circuit.gave_up():
                if self.gave_up is None:
                    self.gave_up = (
                        f"the provider is unavailable: every request failed for {circuit.open_for_s():.0f} s "
                        f"(limits.outage_wait_s = {circuit.outage_wait_s:g}; {circuit.probes} probes); "
                        f"last: {circuit.last_failure}"
                    )
                self.stop.set()
                raise _Stopped
            wait = circuit.claim_probe()
            if wait <= 0:
                return True
            closed = self._closed
            await first_of(self.sleep(min(wait, circuit.until_give_up_s(), 60.0)), closed.wait(), self.stop.wait())
        return False

    def _on_answered(self) -> None:
        """The server is up and taking requests: close the circuit, and a held refusal was about its row."""
        if self.circuit.on_success():
            self._closed.set()
            self._closed = asyncio.Event()
        self.refusals.on_success()

    def no_more_rows(self) -> None:
        """Every row to send has been queued (Dispatch's feed ended): once every row inside ``answer`` is
        held, no other answer can settle the refusal, so the held rows are row errors now, not after
        ``hold_s``. A row still queued cannot start while held rows fill the workers either."""
        self.refusals.no_more_rows()

    async def _is_setup_error(self, req: Request, exc: RowError) -> bool:
        """Whether this refusal is one every row gets (hold the row until that is known, ``hold_s`` at most)."""
        if about_the_row(exc.status_code, str(exc)):
            self._on_answered()
            return False
        return await self.refusals.is_setup_error(req.request_hash, exc)

    async def answer(self, req: Request, prior: Outcome | None = None) -> Outcome | None:
        """The row's outcome, all attempts folded in; None when it was never sent (it stays pending).

        ``prior`` is the row's earlier failed answer in the ledger: its usage and attempts add up.
        """
        self.refusals.row_started()
        try:
            return await self._answer(req, prior)
        finally:
            self.refusals.row_ended()

    async def _answer(self, req: Request, prior: Outcome | None) -> Outcome | None:
        row = _Row.start(req, prior, self.policy)

        def on_retry(exc: BaseException, wait: float) -> None:
            self.summary.retries += 1

        async def nap(seconds: float) -> None:  # a wait between tries ends early when the run stops
            await first_of(self.sleep(seconds), self.stop.wait())

        async def attempt() -> tuple[Reply, float]:  # tenacity runs coroutine functions, not lambdas
            return await self._attempt(req, row)

        while True:
            try:
                reply, worst = await call_paced(attempt, self.policy.retry, self.pacing, sleep=nap, on_retry=on_retry)
            except _Stopped:
                return self._so_far(req, row)
            except FatalAPIError as exc:
                self.pacing.on_refusal()
                self._stop_fatal(exc)
                return self._so_far(req, row)
            except asyncio.CancelledError:
                kept = self._so_far(req, row)  # a re-ask cancelled by a hard stop: its earlier answer was paid for
                if kept is not None:
                    self.abandoned.append(kept)
                raise
            except RowError as exc:
                return await self._refused(req, row, exc)
            except RetryableError as exc:
                return self._error_outcome(
                    req, row, exc, f"{exc} (attempt {row.attempts}, gave up; the next run sends it again)"
                )
            judgement = self._take_reply(req, row, reply, worst)
            if self._try_again(req, row, judgement):
                continue
            if judgement.status != "ok":
                count_error(self.summary, judgement.status, judgement.error or "")
            return self._outcome(req, judgement, row)

    # -- one attempt

    async def _attempt(self, req: Request, row: _Row) -> tuple[Reply, float]:
        """Admit, reserve the worst case, wait for the buckets, send: one try of ``row``'s current body."""
        if self.stop.is_set():
            raise _Stopped
        probe = await self._admit()
        worst = await self._reserve(req, row, probe)
        self.summary.requests_sent += 1
        row.attempts += 1
        self.in_flight += 1
        self.idle.clear()
        started = time.monotonic()
        try:
            reply = await self._send(row, started)
        except RetryableError as exc:
            self.budget.settle(worst, 0.0)
            self._on_retryable(req, row, exc, probe, started)
            raise
        except BaseException:
            self.budget.settle(worst, 0.0)
            if probe:
                self.circuit.probe_abandoned()
            raise
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()
        return reply, worst

    async def _reserve(self, req: Request, row: _Row, probe: bool) -> float:
        """Reserve the attempt's worst-case cost and wait for its turn; the amount reserved. Raises ``_Stopped``."""
        worst = worst_case_usd(req.est_prompt_tokens, row.max_tokens, self.price)
        if not await self.budget.reserve(worst):
            self.budget_hit = True
            self.stop.set()
            if probe:
                self.circuit.probe_abandoned()
            raise _Stopped
        try:
            await self.pacer.acquire(self.pacer.estimate(req.est_prompt_tokens, row.max_tokens))
            if self.stop.is_set():  # stopped while it waited for its turn: nothing new is sent
                raise _Stopped
        except BaseException:
            self.budget.settle(worst, 0.0)
            if probe:
                self.circuit.probe_abandoned()
            raise
        return worst

    async def _send(self, row: _Row, started: float) -> Reply:
        if self.policy.streaming or self.pacing.deadline.settled():
            return await self.send(row.body, self.pacing.timeout_s(row.max_tokens))
        return await self._send_watched(row.body, row.max_tokens, started)

    def _on_retryable(self, req: Request, row: _Row, exc: RetryableError, probe: bool, started: float) -> None:
        """Count a retryable failure and tell pacing and the circuit what it says about the server."""
        summary = self.summary
        if not exc.sent:  # never reached the server (refused, name not found): not a request it received
            summary.requests_sent -= 1
        # Only a request whose fate is unknown (a timeout, a dropped connection) may have been billed:
        # a 429 or a 5xx is the server's answer that it did not do the work.
        row.unconfirmed += exc.sent and exc.status_code is None
        if exc.status_code == 429:
            summary.http_429 += 1
            self.pacer.on_rate_limited(exc.retry_after, ratelimit_of(exc))
            if probe:
                self._on_answered()  # a rate limit is a server that is up
        else:
            timed_out = time.monotonic() - started if exc.kind == "timeout" else None
            self.pacing.on_error(ratelimit_of(exc), timed_out_s=timed_out)
            self.circuit.on_failure(req.request_hash, str(exc), probe=probe)
            exc.during_outage = self.circuit.is_open()
        count_error(summary, exc.kind, str(exc))

    # -- what came back

    def _take_reply(self, req: Request, row: _Row, reply: Reply, worst: float) -> Judgement:
        """Judge an answer, pay for it, and tell pacing what it says."""
        self._on_answered()
        row.latency = reply.latency_ms
        judgement = row.last = self.judge(reply)
        paid = fill_cost(judgement.usage, self.price)
        row.usage = row.usage + paid
        self._count_paid(paid)
        self.budget.settle(worst, paid.usd_spent or 0.0)
        self.pacer.observe(req.est_prompt_tokens, row.max_tokens, paid.prompt_tokens, paid.completion_tokens)
        self.pacing.on_reply(row.latency / 1000.0, reply.ratelimit, paid.completion_tokens, paid.total_tokens)
        return judgement

    def _try_again(self, req: Request, row: _Row, judgement: Judgement) -> bool:
        """Whether to ask again (an invalid answer re-asked, a truncated one with more max_tokens): sets the body."""
        pol = self.policy
        if pol.row_token_budget is not None and (row.usage.total_tokens or 0) >= pol.row_token_budget:
            return False
        if judgement.status == "invalid_output" and row.invalid_left > 0:
            retry_body = self._reask(req, row.body, row.max_tokens, judgement, row.tried)
            if retry_body is not None:
                row.invalid_left -= 1
                count_error(self.summary, "invalid_output", judgement.error or "")
                row.next_body(retry_body)
                return True
        if judgement.status == "truncated" and row.truncated_left > 0 and row.max_tokens < pol.max_tokens_cap:
            row.truncated_left -= 1
            row.max_tokens = min(pol.max_tokens_cap, row.max_tokens * 2)
            row.next_body(with_changes(row.body, max_tokens=row.max_tokens))
            return True
        return False

    async def _refused(self, req: Request, row: _Row, exc: RowError) -> Outcome | None:
        """A 4xx: the row's error, unless every row gets it (a setup error stops the run)."""
        self.pacing.on_refusal()
        if await self._is_setup_error(req, exc):
            self._stop_fatal(
                FatalAPIError(
                    f"every row gets the same refusal, so the request itself is wrong, not a row: {exc} "
                    "(check model.name, endpoint.base_url, the API key and [model.extra])",
                    status_code=exc.status_code,
                )
            )
            return self._so_far(req, row)
        count_error(self.summary, exc.kind, str(exc))
        return self._error_outcome(req, row, exc, str(exc))

    def _error_outcome(self, req: Request, row: _Row, exc: RetryableError | RowError, error: str) -> Outcome:
        return Outcome(
            req.request_hash,
            "error",
            error=error,
            error_kind=exc.kind,
            usage=row.usage,
            attempts=row.attempts,
            unconfirmed_attempts=row.unconfirmed,
            latency_ms=row.latency,
            request_id=exc.request_id,
            server_error=exc.server_error,
        )

    def _so_far(self, req: Request, row: _Row) -> Outcome | None:
        """The last answer received, when the row stops before its attempts are done (None: never answered)."""
        return None if row.last is None else self._outcome(req, row.last, row)

    async def _send_watched(self, body: bytes, max_tokens: int, started: float) -> Reply:
        """``send``, abandoned when the deadline learned *while it waits* passes.

        The first requests of a run go out before any latency is known, with the ceiling as their timeout,
        and one of them hanging would hold the whole run for that long. Until the deadline has settled, each
        request re-reads it twice a second (later requests take the cheap path: one fixed timeout).
        """

        def expired(deadline: float) -> RetryableError:
            return RetryableError(f"no answer within {deadline:g}s", kind="timeout", sent=True)

        task = asyncio.ensure_future(self.send(body, None))
        return await wait_until(task, started, lambda: self.pacing.timeout_s(max_tokens), expired)

    def _reask(self, req: Request, body: bytes, max_tokens: int, last: Judgement, tried: set[bytes]) -> bytes | None:
        """The next try after an invalid answer, or None when every candidate was already sent.

        With ``reask_with_error`` the bad answer and its error go back to the model; otherwise the same
        request with a sampling step. Either way a body already tried is varied (temperature, seed), never
        sent again as it was: a deterministic server would only repeat itself.
        """
        if self.policy.reask_with_error and last.tool_calls:
            candidate = with_changes(req.body, max_tokens=max_tokens, reask_calls=(last.tool_calls, last.error or ""))
        elif self.policy.reask_with_error and last.content is not None:
            candidate = with_changes(req.body, max_tokens=max_tokens, reask=(last.content, last.error or ""))
        else:
            candidate = body
        for _ in range(8):
            if _digest(candidate) not in tried:
                return candidate
            candidate = vary_sampling(candidate)
        return None

    def _outcome(self, req: Request, j: Judgement, row: _Row) -> Outcome:
        error = j.error
        if error and row.attempts > 1:
            error = f"{error} (attempt {row.attempts})"
        return Outcome(
            req.request_hash,
            j.status,
            j.content,
            j.reasoning_content,
            j.finish_reason,
            j.model,
            j.response_id,
            row.usage,
            error,
            j.status if j.status != "ok" else None,
            row.attempts,
            row.unconfirmed,
            row.latency,
            j.tool_calls,
            created=j.created,
            refusal=j.refusal,
            request_id=j.request_id,
            confidence=j.confidence,
        )

    def _count_paid(self, paid: Usage) -> None:
        """The summary counts what this run paid, as it arrives (a retried row's earlier cost is not in it)."""
        s = self.summary
        s.prompt_tokens += paid.prompt_tokens or 0
        s.completion_tokens += paid.completion_tokens or 0
        s.usd_spent += paid.usd_spent or 0.0
        s.credits_used += paid.credits_used or 0.0
