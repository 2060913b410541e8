"""``plan`` and ``status``: what a job would send and what it has done, without sending anything."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pipeline import uptodate
from pipeline.grammar import enforceable, fit_warnings
from pipeline.ledger import Ledger, SeenHashes
from pipeline.prepare import Prepared, iter_requests, prepare
from pipeline.records import Selection, needs_sending
from pipeline.spec import JobSpec
from pipeline.writer import output_totals


@dataclass
class Plan:
    rows: int
    answered: int
    duplicates: int
    to_send: int
    too_long: int
    skipped: int
    est_prompt_tokens: int
    max_completion_tokens: int
    est_cost_usd: float | None
    max_cost_usd: float | None
    est_minutes: float | None
    binding_limit: str | None
    warnings: list[str]
    """Things that will go wrong for every row (e.g. the schema's answer cannot fit in max_tokens)."""


@dataclass
class Status:
    rows: int
    ok: int
    failed: int
    pending: int
    failed_by_status: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    usd_spent: float
    last_run: str | None


def _ledger(p: Prepared) -> Ledger | None:
    return Ledger(p.spec.ledger_path, p.spec.endpoint_key) if p.spec.ledger_path.exists() else None


def _up_to_date(spec: JobSpec, selection: Selection, *, retry_errors: bool = False) -> bool:
    """Whether the output is built from this input, job and ledger: then it holds every count."""
    if not uptodate.eligible(spec, fresh=False, retry_errors=retry_errors):
        return False
    return uptodate.check(spec, selection).up_to_date


def plan_job(spec: JobSpec, selection: Selection | None = None, *, retry_errors: bool = False) -> Plan:
    selection = selection or Selection()
    if _up_to_date(spec, selection, retry_errors=retry_errors):
        # A complete output: nothing left to send; rows not sent are the ones the output says so.
        p = prepare(spec, selection, need_key=False, read_everything=False)
        counts = output_totals(spec.job.output)[0]
        too_long, skipped = counts.get("too_long", 0), counts.get("skipped", 0)
        rows = sum(counts.values())
        return Plan(
            rows,
            rows - too_long - skipped,
            0,
            0,
            too_long,
            skipped,
            0,
            0,
            *_estimates(spec, p, 0, 0),
            [*(p.warnings or ()), *schema_warnings(p)],
        )
    p = prepare(spec, selection, need_key=False)
    ledger = _ledger(p)
    answered = duplicates = to_send = prompt = too_long = skipped = 0
    # The hashes already counted to send live on disk, not in a Python set: 10M rows plan in bounded memory.
    seen = SeenHashes()
    try:
        for chunk in iter_requests(p):
            known = ledger.known([r.request_hash for r in chunk]) if ledger else {}
            sendable = []
            for r in chunk:
                if r.not_sent is not None:
                    too_long += r.not_sent.status == "too_long"
                    skipped += r.not_sent.status == "skipped"
                elif not needs_sending(known.get(r.request_hash), retry_errors=retry_errors):
                    answered += 1
                else:
                    sendable.append(r)
            if not spec.job.dedupe:
                to_send += len(sendable)
                prompt += sum(r.est_prompt_tokens for r in sendable)
                continue
            new = seen.add_new([r.request_hash for r in sendable])
            for r in sendable:
                if r.request_hash in new:  # the first row asking it sends it; later ones reuse the answer
                    new.discard(r.request_hash)
                    to_send += 1
                    prompt += r.est_prompt_tokens
                else:
                    duplicates += 1
    finally:
        seen.close()
        if ledger:
            ledger.close()
    return Plan(
        p.rows,
        answered,
        duplicates,
        to_send,
        too_long,
        skipped,
        prompt,
        to_send * spec.model.max_tokens,
        *_estimates(spec, p, to_send, prompt),
        [*(p.warnings or ()), *schema_warnings(p)],
    )


def _estimates(
    spec: JobSpec, p: Prepared, to_send: int, prompt: int
) -> tuple[float | None, float | None, float | None, str | None]:
    """Expected cost, maximum cost, minutes and the binding limit of sending ``to_send`` requests."""
    completion = to_send * spec.model.max_tokens
    cost = p.price.usd(prompt, completion) if p.price else None
    # Typical answers use far fewer than max_tokens; the expected cost assumes a quarter of it.
    expected = p.price.usd(prompt, completion // 4) if p.price else None
    minutes: float | None = None
    binding = None
    lim = spec.limits
    candidates = []
    if lim.rpm:
        candidates.append((to_send / lim.rpm, "rpm"))
    if lim.tpm:
        candidates.append(((prompt + completion // 4) / lim.tpm, "tpm"))
    if candidates:
        minutes, binding = max(candidates)
    return expected, cost, minutes, binding


def schema_warnings(p: Prepared) -> list[str]:
    """Whether an answer of the schema, as the server will enforce it, can fit in ``max_tokens``."""
    if p.schema is None:
        return []
    spec = p.spec
    sent = p.schema
    if spec.structured_output == "json_object_schema" and p.tools is None:  # functions carry the schema as is
        sent = enforceable(p.schema, max_tokens=spec.model.max_tokens)
    return fit_warnings(sent, spec.model.max_tokens, source=p.schema_source)


def _last_run(ledger: Ledger) -> str | None:
    lr = ledger.last_run()
    if not lr:
        return None
    started = dt.datetime.fromtimestamp(lr[1], dt.UTC).isoformat(timespec="seconds")
    code = lr[3] if lr[3] is not None else "none (still running, or killed)"
    return f"{lr[0]} started {started}, exit code {code}"


def job_status(spec: JobSpec, selection: Selection | None = None) -> Status:
    selection = selection or Selection()
    if _up_to_date(spec, selection):
        # The output holds every row's answer and usage (repeats carry zero): count it, not the input.
        counts, prompt, completion, usd = output_totals(spec.job.output)
        book = Ledger(spec.ledger_path, spec.endpoint_key)
        try:
            last = _last_run(book)
        finally:
            book.close()
        failed_by = {k: n for k, n in counts.items() if k not in ("ok", "pending")}
        return Status(
            sum(counts.values()),
            counts.get("ok", 0),
            sum(failed_by.values()),
            counts.get("pending", 0),
            failed_by,
            prompt,
            completion,
            usd,
            last,
        )
    p = prepare(spec, selection, need_key=False)
    ledger = _ledger(p)
    ok = failed = pending = 0
    by_status: dict[str, int] = {}
    prompt = completion = 0
    usd = 0.0
    last = None
    try:
        if ledger is not None:
            last = _last_run(ledger)
        for chunk in iter_requests(p):
            hashes = [r.request_hash for r in chunk]
            known = ledger.known_usage(hashes) if ledger else {}
            if ledger is not None:
                ledger.map_rows([(r.row_index, r.request_hash) for r in chunk])
            for h in hashes:
                answer = known.get(h)
                if answer is None:
                    pending += 1
                    continue
                status, p_tokens, c_tokens, cost = answer
                prompt, completion, usd = prompt + p_tokens, completion + c_tokens, usd + cost
                if status == "ok":
                    ok += 1
                else:
                    failed += 1
                    by_status[status] = by_status.get(status, 0) + 1
        if ledger is not None:
            # Each distinct request was paid once, however many rows asked it: take the repeats back out.
            # The row map lives in SQLite, so memory does not grow with the input.
            extra_prompt, extra_completion, extra_usd = ledger.repeated_usage()
            prompt, completion, usd = prompt - extra_prompt, completion - extra_completion, usd - extra_usd
    finally:
        if ledger:
            ledger.close()
    return Status(p.rows, ok, failed, pending, by_status, prompt, completion, usd, last)
