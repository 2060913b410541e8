"""``plan`` and ``status``: what a job would send and what it has done, without sending anything.

Before any answer, ``plan`` can only guess: input tokens are characters/4 plus each message's overhead,
output tokens a quarter of ``max_tokens``, prices the price table's. Tokenizers differ (a text of long
words is far fewer tokens than characters/4) and so do answers, so once the ledger holds answers to this
job's own requests (a ``seedbatch run --limit 20`` first look), the plan measures them (``Measured``): the
input tokens billed per estimated one (applied to each remaining row's estimate, so longer rows still
cost more), the output tokens per answer, and the price per input and output token the server billed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pipeline.answers.costs import Price
from pipeline.job.spec import JobSpec
from pipeline.records import Request, Selection, needs_sending
from pipeline.requests.grammar import enforceable, fit_warnings
from pipeline.requests.prepare import Prepared, iter_requests, prepare
from pipeline.state import uptodate
from pipeline.state.ledger import Ledger
from pipeline.state.seen_hashes import SeenHashes
from pipeline.tables.output_tables import output_totals

#: Answers measured at most: enough for stable means, and a plan of a 10M-row job that is mostly
#: answered stops looking up usage (and remembering hashes) after them.
MEASURE_ANSWERS = 10_000
NOTHING = "nothing to send"
#: The estimate's basis before any answer of this job is in the ledger.
GUESSED = (
    "no answers of this job yet: input tokens are characters/4 + message overhead, output a quarter of "
    "max_tokens, prices the price table's (a first look, `seedbatch run --limit 20`, lets plan measure them)"
)


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
    est_completion_tokens: int = 0
    """Expected output tokens of the rows to send (``basis`` says from what)."""
    basis: str = GUESSED
    """What the estimates rest on, for people: a guess, or what was measured on this job's answers."""
    measured: int = 0
    """Answers of this job the estimates were measured on (0: guessed)."""


@dataclass
class Measured:
    """Usage of answers already in the ledger for this job's requests, against the plan's own estimates."""

    answers: int = 0
    est_prompt: int = 0
    prompt: int = 0
    completion: int = 0
    usd: float = 0.0
    # Sums for the least-squares fit of usd = a·prompt + b·completion (the price the server billed).
    pp: float = 0.0
    pc: float = 0.0
    cc: float = 0.0
    pu: float = 0.0
    cu: float = 0.0

    def add(self, req: Request, prompt: int, completion: int, usd: float) -> None:
        self.answers += 1
        self.est_prompt += req.est_prompt_tokens
        self.prompt, self.completion, self.usd = self.prompt + prompt, self.completion + completion, self.usd + usd
        self.pp += prompt * prompt
        self.pc += prompt * completion
        self.cc += completion * completion
        self.pu += prompt * usd
        self.cu += completion * usd

    def billed_price(self, table: Price | None) -> tuple[Price | None, str]:
        """USD per million input and output tokens as billed on these answers, and where it came from.

        Billing is linear in the two counts, so two unknowns fit exactly once answers differ in their mix of
        input and output; when they do not, the table's prices scaled to what was billed.
        """
        if self.usd <= 0:
            return table, "the price table"
        det = self.pp * self.cc - self.pc * self.pc
        if det > 1e-6 * self.pp * self.cc:
            a = (self.pu * self.cc - self.cu * self.pc) / det
            b = (self.cu * self.pp - self.pu * self.pc) / det
            if a >= 0 and b >= 0:
                fitted = Price(a * 1e6, b * 1e6)
                if table is not None and _close(fitted, table):  # also what a ledger filled from the table holds
                    return table, "the price table, which those answers' cost matches"
                return fitted, "as billed on those answers"
        if table is not None and (listed := table.usd(self.prompt, self.completion)) > 0:
            k = self.usd / listed
            scaled = Price(table.input_per_million * k, table.output_per_million * k)
            return scaled, "the price table scaled to the bill"
        per_token = self.usd / max(self.prompt + self.completion, 1) * 1e6
        return Price(per_token, per_token), "as billed on those answers, per token"


def _close(a: Price, b: Price) -> bool:
    return all(
        abs(x - y) <= 0.005 * max(abs(y), 1e-12)
        for x, y in ((a.input_per_million, b.input_per_million), (a.output_per_million, b.output_per_million))
    )


@dataclass
class JobStatus:
    """What ``seedbatch status`` reports about a job's output and ledger (one row's status is a ``Status``)."""

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
            *_estimates(spec, p, 0, 0, Measured()),
            [*(p.warnings or ()), *schema_warnings(p)],
            *_learned(spec, p, 0, Measured()),
        )
    p = prepare(spec, selection, need_key=False)
    ledger = _ledger(p)
    answered = duplicates = to_send = prompt = too_long = skipped = 0
    measured = Measured()
    measured_hashes: set[str] = set()
    # The hashes already counted to send live on disk, not in a Python set: 10M rows plan in bounded memory.
    seen = SeenHashes()
    try:
        for chunk in iter_requests(p):
            known = ledger.known([r.request_hash for r in chunk]) if ledger else {}
            sendable = []
            done: list[Request] = []
            for r in chunk:
                if r.not_sent is not None:
                    too_long += r.not_sent.status == "too_long"
                    skipped += r.not_sent.status == "skipped"
                elif not needs_sending(known.get(r.request_hash), retry_errors=retry_errors):
                    answered += 1
                    done.append(r)
                else:
                    sendable.append(r)
            if ledger is not None and done and measured.answers < MEASURE_ANSWERS:
                _measure(ledger, done, measured, measured_hashes)
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
        _learned_prompt(prompt, measured),
        to_send * spec.model.max_tokens,
        *_estimates(spec, p, to_send, prompt, measured),
        [*(p.warnings or ()), *schema_warnings(p)],
        *_learned(spec, p, to_send, measured),
    )


def _measure(ledger: Ledger, done: list[Request], measured: Measured, hashes: set[str]) -> None:
    """Add the billed usage of answered requests not measured yet (each distinct request once)."""
    usage = ledger.known_usage([r.request_hash for r in done])
    for r in done:
        found = usage.get(r.request_hash)
        if found is None or r.request_hash in hashes or measured.answers >= MEASURE_ANSWERS:
            continue
        _, prompt, completion, usd = found
        if prompt > 0:  # billed: an error that never reached the model has no usage to learn from
            hashes.add(r.request_hash)
            measured.add(r, prompt, completion, usd)


def _learned_prompt(est_prompt: int, measured: Measured) -> int:
    """The rows' estimated input tokens, scaled by what the server billed per estimated token so far."""
    if not measured.answers or measured.est_prompt <= 0:
        return est_prompt
    return round(est_prompt * measured.prompt / measured.est_prompt)


def _completion(spec: JobSpec, to_send: int, measured: Measured) -> int:
    """Expected output tokens: the mean of this job's answers, else a quarter of ``max_tokens``."""
    if measured.answers:
        return round(to_send * measured.completion / measured.answers)
    return to_send * spec.model.max_tokens // 4


def _price(p: Prepared, measured: Measured) -> tuple[Price | None, str]:
    return measured.billed_price(p.price) if measured.answers else (p.price, "the price table")


def _learned(spec: JobSpec, p: Prepared, to_send: int, measured: Measured) -> tuple[int, str, int]:
    """Expected output tokens, the basis of every estimate in words, and the answers measured."""
    if not to_send:
        return 0, NOTHING, 0
    completion = _completion(spec, to_send, measured)
    if not measured.answers:
        return completion, GUESSED, 0
    n = measured.answers
    price, source = _price(p, measured)
    basis = (
        f"measured on {n:,} answered request{'s' if n != 1 else ''} of this job: "
        f"{measured.prompt / max(measured.est_prompt, 1):.2f} input tokens billed per characters/4 estimate, "
        f"{measured.completion / n:.1f} output tokens per answer"
    )
    if price is not None:
        per_million = f"${price.input_per_million:.4g}/${price.output_per_million:.4g}"
        basis += f", {per_million} per 1M input/output tokens ({source})"
    return completion, basis, n


def _estimates(
    spec: JobSpec, p: Prepared, to_send: int, est_prompt: int, measured: Measured
) -> tuple[float | None, float | None, float | None, str | None]:
    """Expected cost, maximum cost, minutes and the binding limit of sending ``to_send`` requests."""
    price, _ = _price(p, measured)
    prompt = _learned_prompt(est_prompt, measured)
    most = to_send * spec.model.max_tokens
    completion = _completion(spec, to_send, measured)
    cost = price.usd(max(prompt, est_prompt), most) if price else None
    expected = price.usd(prompt, completion) if price else None
    minutes: float | None = None
    binding = None
    lim = spec.limits
    candidates = []
    if lim.rpm:
        candidates.append((to_send / lim.rpm, "rpm"))
    if lim.tpm:
        candidates.append(((prompt + completion) / lim.tpm, "tpm"))
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


def job_status(spec: JobSpec, selection: Selection | None = None) -> JobStatus:
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
        return JobStatus(
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
    return JobStatus(p.rows, ok, failed, pending, by_status, prompt, completion, usd, last)


@dataclass
class StagesPlan:
    """What a job with ``[votes]``/``[escalation]`` would cost on top of ``plan_job``'s one-sample view.

    The escalation share is unknown before the first stage has answered; after it, it is the share of
    answered rows that meet the escalation's conditions in the first stage's outputs (a ``--limit``
    first look measures it), applied to the cost of escalating every selected row.
    """

    samples: int
    samples_to_send: int
    samples_cost_usd: float | None
    samples_max_cost_usd: float | None
    samples_minutes: float | None = None
    """The samples run one after the other, each paced by the job's limits: their durations add."""
    escalation_share: tuple[int, int] | None = None
    """(rows meeting the conditions, rows answered) in the first stage so far; None: not measured yet."""
    escalation_cost_usd: float | None = None
    escalation_max_cost_usd: float | None = None
    """Every selected row escalated: the most the escalation can cost."""


def _add_costs(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def plan_stages(spec: JobSpec, selection: Selection | None = None, *, retry_errors: bool = False) -> StagesPlan:
    """Price every sample still to send (each a ``plan_job`` of its own seed) and the escalation."""
    from pipeline.quality import voting

    plans = [plan_job(s, selection, retry_errors=retry_errors) for s in voting.sample_specs(spec)]
    out = StagesPlan(
        len(plans),
        sum(p.to_send for p in plans),
        _add_costs([p.est_cost_usd for p in plans]),
        _add_costs([p.max_cost_usd for p in plans]),
        _add_costs([p.est_minutes for p in plans]),
    )
    esc = voting.escalation_spec(spec, every_row=True)
    if esc is None:
        return out
    every = plan_job(esc, selection, retry_errors=retry_errors)
    out.escalation_max_cost_usd = every.est_cost_usd
    out.escalation_share = voting.escalation_share(spec)
    if out.escalation_share is not None and every.est_cost_usd is not None:
        chosen, answered = out.escalation_share
        out.escalation_cost_usd = every.est_cost_usd * chosen / answered
    return out


def stages_lines(sp: StagesPlan) -> list[str]:
    """``seedbatch plan``'s lines for votes and escalation."""
    cost = f"~${sp.samples_cost_usd:.4f} expected" if sp.samples_cost_usd is not None else "cost unknown"
    most = f"; at most ${sp.samples_max_cost_usd:.4f}" if sp.samples_max_cost_usd is not None else ""
    took = f", ~{sp.samples_minutes:.1f} min" if sp.samples_minutes is not None else ""
    lines = [f"votes          {sp.samples} samples a row: {sp.samples_to_send:,} requests to send, {cost}{most}{took}"]
    if sp.escalation_max_cost_usd is None and sp.escalation_share is None:
        return lines
    every = f"${sp.escalation_max_cost_usd:.4f}" if sp.escalation_max_cost_usd is not None else "unknown"
    if sp.escalation_share is None:
        lines.append(
            f"escalation     share unknown until the first stage has answered (a `--limit 20` first look measures it); "
            f"every row escalated: ~{every}"
        )
    else:
        chosen, answered = sp.escalation_share
        expected = f"~${sp.escalation_cost_usd:.4f}" if sp.escalation_cost_usd is not None else "unknown"
        lines.append(
            f"escalation     {chosen:,} of {answered:,} answered rows met the conditions ({chosen / answered:.1%}): "
            f"{expected} expected; every row escalated: ~{every}"
        )
    return lines
