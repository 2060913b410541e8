"""The values passed between stages, and the pure rules over them (which answers are sent again,
which exit code a run maps to, how errors are counted). No I/O.

One name per concept, shared with the output columns and the README: ``request_hash`` is the identity
of paid work, ``row_key`` the identity of an input row, ``status`` one of ``STATUSES``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import IntEnum, StrEnum
from typing import Any, Literal


class ExitCode(IntEnum):
    """What a run's exit code means; the README's table is this one."""

    OK = 0
    ROWS_FAILED = 1  # some rows ended error/invalid_output/refused/truncated/too_long
    BAD_INPUT = 2  # a user mistake (job, flag, input): nothing was sent
    PARTIAL = 3  # stopped early (signal, budget): rows left pending; rerun to resume
    FATAL_API = 4  # 401/403/404: every row would fail
    LOCKED = 5  # another run of the job holds its lock
    UNAVAILABLE = 6  # the provider failed every request for limits.outage_wait_s: rows left pending
    INTERNAL = 70  # a bug in seedbatch


class StopReason(StrEnum):
    """Why a run stopped before every row was answered (``RunSummary.stop_reason`` says the details)."""

    SIGNAL = "signal"
    FATAL = "fatal"
    OUTAGE = "outage"
    BUDGET = "budget"
    SHARDS_FAILED = "shards_failed"


@dataclass(frozen=True, slots=True)
class Selection:
    """Which rows of the input a run covers: all, the first ``limit``, or a seeded ``sample``."""

    limit: int | None = None
    """Only the first ``limit`` rows (``--limit``)."""
    sample: int | None = None
    """``sample`` rows drawn at random with ``sample_seed`` (``--sample``), the same rows on every rerun."""
    sample_seed: int = 0
    """The seed of ``sample``'s draw (``--sample-seed``)."""


@dataclass(frozen=True, slots=True)
class RowRange:
    """Positions ``[start, stop)`` among a run's selected rows: the part of the job one shard sends."""

    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The OpenAI-convention ``x-ratelimit-*`` headers of one response; ``None`` where not said.

    ``limit_*`` are per minute (requests, tokens); ``reset_*_s`` are seconds until the bucket is full.
    """

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None


class Status(StrEnum):
    """What became of one row: the output's ``status`` column. A ``str``, so ``Status.OK == "ok"``."""

    OK = "ok"
    """The model answered and the answer passed the job's checks."""
    ERROR = "error"
    """The request failed (``error_kind`` says how); transient kinds are sent again by the next run."""
    INVALID_OUTPUT = "invalid_output"
    """The answer failed the output schema or checks after every re-ask."""
    REFUSED = "refused"
    """The model refused (``refusal`` or a content-filter finish)."""
    TRUNCATED = "truncated"
    """The answer stopped at ``max_tokens``."""
    TOO_LONG = "too_long"
    """The prompt is over the model's context window: never sent."""
    SKIPPED = "skipped"
    """Every placeholder of the prompt was null or empty: never sent."""
    PENDING = "pending"
    """Not answered yet (the run stopped early); only in partial outputs."""


#: Every value the ``status`` column can take, in the order outputs and reports list them.
STATUSES = tuple(s.value for s in Status)

#: Statuses decided before sending, from the row and the job's settings alone: worked out again on every
#: run (free), so a changed setting (``prompt.send_empty``, ``model.context_tokens``) takes effect at once.
NOT_SENT = frozenset({"too_long", "skipped"})

#: Error kinds of a request that gave up on a passing condition (server down, timeouts, 5xx, 429): the
#: next run sends it again by itself. Final answers (ok, refused, invalid after re-asks, 4xx) wait for
#: ``--retry-errors``.
TRANSIENT_KINDS = frozenset(
    {"timeout", "connect", "connection", "stall", "bad_response", "http_408", "http_409", "http_429"}
)


def is_transient(error_kind: str | None) -> bool:
    if error_kind is None:
        return False
    if error_kind in TRANSIENT_KINDS:
        return True
    return error_kind.startswith("http_5") and error_kind[5:].isdigit()


def needs_sending(known: tuple[str, str | None] | None, *, retry_errors: bool) -> bool:
    """Whether a request with this ledger entry (status, error kind) is sent: one rule for run and plan."""
    if known is None:
        return True
    status, kind = known
    if status == "ok":
        return False
    if status in NOT_SENT or (status == "error" and is_transient(kind)):
        return True
    return retry_errors


@dataclass(frozen=True, slots=True)
class NotSent:
    """Why a request is answered without sending it: a status, a message and an error kind."""

    status: str
    error: str
    error_kind: str


@dataclass(frozen=True, slots=True)
class Row:
    """One input row as plain Python values, with its position and its stable key."""

    index: int
    key: str
    values: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Request:
    """A rendered request: the exact bytes sent and the hash that identifies the paid answer."""

    row_index: int
    row_key: str
    body: bytes
    request_hash: str
    est_prompt_tokens: int
    max_tokens: int
    null_cells: int = 0
    not_sent: NotSent | None = None
    """Set when the request must not be sent (bad media, every placeholder empty, over the context)."""


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens and cost of one or more attempts. ``None`` means the server did not say."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    reasoning_tokens: int | None = None
    cached_tokens: int | None = None
    credits_used: float | None = None
    usd_spent: float | None = None

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(_add(a, b) for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self) -> tuple[Any, ...]:
        return (
            self.prompt_tokens,
            self.completion_tokens,
            self.total_tokens,
            self.reasoning_tokens,
            self.cached_tokens,
            self.credits_used,
            self.usd_spent,
        )


def _add(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


@dataclass(frozen=True, slots=True)
class Reply:
    """A 200 answer from the server, decoded but not yet judged."""

    data: dict[str, Any]
    latency_ms: float
    #: The server's ``x-ratelimit-*`` headers on this answer, when it sent any.
    ratelimit: RateLimits | None = None
    #: The server's ``x-request-id`` header on this answer (Batch output lines quote it).
    request_id: str | None = None
    #: The request body this answers, as the caller gave it: a Batch line's own ``tools`` judge its answer.
    sent: bytes | None = None


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One function call in an answer, as the server sent it: ``arguments`` is the model's JSON text, unchecked."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """The final, ledger-worthy result of one request (all attempts folded in).

    ``answers.record.ANSWER_FIELDS`` maps each field to its ledger and output column: a new field is added
    there too, or it is neither kept nor written.
    """

    request_hash: str
    status: str
    content: str | None = None
    reasoning_content: str | None = None
    finish_reason: str | None = None
    model: str | None = None
    response_id: str | None = None
    usage: Usage = field(default_factory=Usage)
    error: str | None = None
    error_kind: str | None = None
    attempts: int = 0
    unconfirmed_attempts: int = 0
    latency_ms: float | None = None
    tool_calls: tuple[ToolCall, ...] | None = None
    """The last answer's function calls (``None``: it called none)."""
    created: int | None = None
    """The last answer's ``created`` (Unix seconds), as the server sent it."""
    refusal: str | None = None
    """The last answer's ``message.refusal``, whole, as the server sent it."""
    request_id: str | None = None
    """The server's ``x-request-id`` header on the last response, answer or error."""
    server_error: str | None = None
    """An HTTP error's ``error`` object as the server sent it (JSON text, API key masked)."""
    confidence: float | None = None
    """The last answer's mean token probability (``validator.confidence_of``); None without log-probs."""


#: What a run did to its output: nothing (it was ``up_to_date``), ``patched`` (the rows to redo rewritten,
#: every other row copied from the old output) or ``rebuilt`` (written whole from the input and the ledger).
OutputAction = Literal["up_to_date", "patched", "rebuilt"]


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What a run did: the value ``run_job`` returns and each progress callback receives.

    A snapshot: later counting does not change it, so a callback may keep it or hand it to another thread.
    """

    job: str
    """The job's name (``[job] name``)."""
    run_id: str
    """This run's id, as the ledger's runs log and the manifest record it."""
    rows_total: int = 0
    """Rows the run covers: the input's rows after ``--limit`` / ``--sample``."""
    rows_by_status: dict[Status, int] = field(default_factory=dict)
    """Rows of the output per status (``pending``: not answered yet); while running, the rows answered so far."""
    rows_from_ledger: int = 0
    """Rows answered by an earlier run, taken from the ledger without sending."""
    rows_deduplicated: int = 0
    """Rows whose request equals another row's in this run: sent once, the answer shared."""
    requests_sent: int = 0
    """HTTP requests sent, retries and re-asks included."""
    retries: int = 0
    """Requests sent again after a transient failure (timeouts, 5xx, 429)."""
    http_429: int = 0
    """429 (rate limited) answers received."""
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    """Failed attempts per error kind (``timeout``, ``http_500``, ``invalid_json``, ...)."""
    error_examples: dict[str, str] = field(default_factory=dict)
    """One message per error kind (the first, cut at 300 characters): a summary, never one line per row."""
    null_cells: int = 0
    """Null or empty input cells the prompts rendered as empty text."""
    prompt_tokens: int = 0
    """Prompt tokens the server reported for this run's requests."""
    completion_tokens: int = 0
    """Completion tokens the server reported for this run's requests."""
    usd_spent: float = 0.0
    """Dollars spent by this run: the server's figure where it says one, else tokens times ``[costs]``."""
    credits_used: float = 0.0
    """Credits the server reported (providers that bill in credits)."""
    started_at: float = 0.0
    """When the run started (Unix seconds)."""
    ended_at: float = 0.0
    """When the run ended (Unix seconds); 0 while it runs."""
    interrupted: bool = False
    """The run stopped early (a signal, the budget, an outage, a fatal answer): rows may be left pending."""
    stopped_by: StopReason | None = None
    """What stopped the run early, for code (``None``: it ran to the end)."""
    stop_reason: str | None = None
    """What stopped the run early, for people (``stopped_by`` is what code acts on)."""
    output_path: str | None = None
    """Where the output was written (``None``: not written)."""
    manifest_path: str | None = None
    """Where the output's manifest was written (``None``: not written)."""
    exit_code: ExitCode = ExitCode.OK
    """What the CLI exits with for this run (see ``ExitCode``)."""
    up_to_date: bool = False
    """Nothing was done: the output was already built from this input, job and ledger (``uptodate``)."""
    output_action: OutputAction | None = None
    """None while the run has not written its output (or could not)."""

    @property
    def wall_s(self) -> float:
        """Seconds the run took (at least a nanosecond, so rates never divide by zero)."""
        return max(self.ended_at - self.started_at, 1e-9)

    def as_dict(self) -> dict[str, Any]:
        """Every field as plain JSON-able values: the one conversion the manifest, ledger and Ray use."""
        return _plain(asdict(self))


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    """Enum values to their plain str/int, so JSON and Ray see the same values from a summary or a tally."""
    data["stopped_by"] = data["stopped_by"].value if data["stopped_by"] else None
    data["exit_code"] = int(data["exit_code"])
    data["rows_by_status"] = {str(k): v for k, v in data["rows_by_status"].items()}
    return data


@dataclass(slots=True)
class RunTally:
    """The counters a run updates while it works; ``snapshot()`` is what callers and callbacks see.

    The same fields as ``RunSummary`` (documented there), mutable; statuses are counted by their text,
    as the ``Outcome`` that carries them holds it.
    """

    job: str
    run_id: str
    rows_total: int = 0
    rows_by_status: dict[str, int] = field(default_factory=dict)
    rows_from_ledger: int = 0
    rows_deduplicated: int = 0
    requests_sent: int = 0
    retries: int = 0
    http_429: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    error_examples: dict[str, str] = field(default_factory=dict)
    null_cells: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd_spent: float = 0.0
    credits_used: float = 0.0
    started_at: float = 0.0
    ended_at: float = 0.0
    interrupted: bool = False
    stopped_by: StopReason | None = None
    stop_reason: str | None = None
    output_path: str | None = None
    manifest_path: str | None = None
    exit_code: int = 0
    up_to_date: bool = False
    output_action: OutputAction | None = None

    @property
    def wall_s(self) -> float:
        return max(self.ended_at - self.started_at, 1e-9)

    def as_dict(self) -> dict[str, Any]:
        """Every field as plain JSON-able values (the same as ``RunSummary.as_dict``)."""
        return _plain(asdict(self))

    def stop(self, by: StopReason, message: str) -> None:
        """Record the first reason a run stopped early; later ones do not overwrite it."""
        if self.stopped_by is None:
            self.stopped_by = by
            self.stop_reason = message

    def snapshot(self) -> RunSummary:
        """The counters as they are now, as a frozen ``RunSummary`` with its own copies of the dicts.

        Field by field by name, so a counter added to both classes needs no line here."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(
            rows_by_status={Status(k): v for k, v in self.rows_by_status.items()},
            errors_by_kind=dict(self.errors_by_kind),
            error_examples=dict(self.error_examples),
            exit_code=ExitCode(self.exit_code),
        )
        return RunSummary(**values)


def count_error(summary: RunTally, kind: str, message: str) -> None:
    """Errors are summarized by kind with one example, never one line per row."""
    summary.errors_by_kind[kind] = summary.errors_by_kind.get(kind, 0) + 1
    summary.error_examples.setdefault(kind, message[:300])


def exit_code_for(summary: RunSummary | RunTally) -> ExitCode:
    """The exit code a run's outcome maps to: one rule for a run and for an up-to-date rerun."""
    if summary.stopped_by is StopReason.FATAL:
        return ExitCode.FATAL_API
    if summary.stopped_by is StopReason.OUTAGE:
        return ExitCode.UNAVAILABLE
    if summary.rows_by_status.get(Status.PENDING):
        return ExitCode.PARTIAL
    if any(n for status, n in summary.rows_by_status.items() if status not in ("ok", "skipped")):
        return ExitCode.ROWS_FAILED
    return ExitCode.OK
