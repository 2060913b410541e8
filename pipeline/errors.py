"""The error tree, classified by what the caller does next.

::

    SeedbatchError                    base; every error seedbatch raises on purpose
    ├── SpecError                     bad job file, bad schema, bad flag        → exit 2, nothing sent
    ├── InputError                    missing/corrupt input, missing column     → exit 2, nothing sent
    │   └── PartialOutputError        the input broke mid-run: partial output   → exit 2, answers kept
    ├── LockedError                   another run of this job holds its lock    → exit 5, nothing sent
    ├── FatalAPIError                 401/403/404, the same refusal for every   → no new sends, answers in flight
    │                                 row, TLS to a plain-HTTP server             kept, exit 4
    └── RequestError                  one request went wrong
        ├── RetryableError            timeout, connection, 408/409/429/5xx      → backoff, retry, then row 'error';
        │                                                                         nearly all failing: the circuit opens
        └── RowError                  400/413/422 for this row                  → recorded on the row, run goes on

Row outcomes that are not exceptions (invalid JSON, off-schema, refusal, truncation) live in
``records.Outcome.status``: they are answers, paid for, and belong in the ledger.

Messages carry the object, the bad value and the next step, and never the API key.
"""

from __future__ import annotations


class SeedbatchError(Exception):
    """Base of every error seedbatch raises on purpose; the CLI prints its message as one line."""

    exit_code = 1


class SpecError(SeedbatchError):
    """The job file, a schema or a flag is wrong: the user must edit something before any request."""

    exit_code = 2


class InputError(SeedbatchError):
    """The input table is missing, unreadable or lacks a column the job needs."""

    exit_code = 2


class PartialOutputError(InputError):
    """The input broke after sending began: the rows read before it were written as a partial output."""


class LockedError(SeedbatchError):
    """Another live process runs this job; cron should treat this as 'skipped', not 'failed'."""

    exit_code = 5


class FatalAPIError(SeedbatchError):
    """The endpoint refuses every request (bad key, unknown model): retrying would only burn time."""

    exit_code = 4

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class RequestError(SeedbatchError):
    """One HTTP request failed; ``sent`` says whether the server may have received (and billed) it."""

    #: The response's ``x-request-id`` header and its ``error`` object as JSON text (set by the client
    #: when the failure is an HTTP answer), so the row's error keeps what the server said, unchanged.
    request_id: str | None = None
    server_error: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        kind: str = "error",
        sent: bool = True,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.kind = kind
        self.sent = sent
        self.retry_after = retry_after
        #: Failed while the circuit was open (``breaker.Circuit``): uses up none of the row's attempts.
        self.during_outage = False


class RetryableError(RequestError):
    """Worth another try after a wait (``retry_after`` seconds when the server said so)."""


class RowError(RequestError):
    """The server rejected this row's request as malformed; the same request would fail again."""
