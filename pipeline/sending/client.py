"""One HTTP client per run: bytes in, decoded ``Reply`` out, every failure mapped onto the error tree.

The transport is injectable (``httpx.MockTransport`` in unit tests). By default requests go through
httpx's API on aiohttp's connection pool (``httpx-aiohttp``, the route the OpenAI SDK offers for high
concurrency): httpx's own pool costs several times more CPU per request once hundreds are in flight.
A job of at most ``FEW_REQUESTS`` rows uses httpx's own pool instead: at that size its CPU per request
does not matter, and importing aiohttp would be most of a small job's start-up time and memory.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import orjson

from pipeline.errors import FatalAPIError, RequestError, RetryableError, RowError
from pipeline.records import RateLimits, Reply
from pipeline.sending.connection_causes import connect_cause, was_sent
from pipeline.sending.sse import is_sse, read_events, streaming_body, wait_until

__all__ = [
    "FEW_REQUESTS",
    "Client",
    "RateLimits",
    "ServerRetryableError",
    "default_transport",
    "parse_duration",
    "parse_rate_limits",
    "parse_retry_after",
    "ratelimit_of",
    "wait_until",
]

E = TypeVar("E", bound=RequestError)

RETRYABLE_STATUS = frozenset({408, 409, 429})
FATAL_STATUS = {
    401: "the API key was rejected",
    403: "the API key may not use this model or endpoint",
    404: "the model or endpoint does not exist",
}
MAX_RETRY_AFTER_S = 600.0
#: A 500 that is really a 422: llama-cpp-python's error handler turns request validation errors into 500s.
_REQUEST_VALIDATION = re.compile(r"^\d+ validation errors?: .*'loc': \('body',")


def parse_retry_after(headers: httpx.Headers | dict[str, str], now: float | None = None) -> float | None:
    """Seconds to wait as the server asked: ``retry-after-ms``, ``Retry-After`` seconds or HTTP date.

    Nonsense (negative, NaN, unparseable) means "not said", so the caller falls back to backoff.
    """
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return min(value, MAX_RETRY_AFTER_S)
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        value = parsed.timestamp() - (now if now is not None else time.time())
        value = max(value, 0.0)
    if not math.isfinite(value) or value < 0:
        return None
    return min(value, MAX_RETRY_AFTER_S)


_NO_LIMITS = RateLimits()
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(raw: str | None) -> float | None:
    """Seconds in OpenAI's reset format (``20ms``, ``1.5s``, ``6m0s``, ``1h2m3s``) or a bare number of seconds."""
    if raw is None:
        return None
    text = raw.strip()
    try:
        value = float(text)
    except ValueError:
        pos, value = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                return None
            value += float(match.group(1)) * _UNIT_S[match.group(2)]
            pos = match.end()
        if pos == 0 or pos != len(text):
            return None
    return value if math.isfinite(value) and value >= 0 else None


def _count(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return int(value) if math.isfinite(value) and value >= 0 else None


def parse_rate_limits(headers: httpx.Headers | dict[str, str]) -> RateLimits | None:
    """The ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers, or ``None`` if none is usable."""
    found = RateLimits(
        limit_requests=_count(headers.get("x-ratelimit-limit-requests")),
        remaining_requests=_count(headers.get("x-ratelimit-remaining-requests")),
        reset_requests_s=parse_duration(headers.get("x-ratelimit-reset-requests")),
        limit_tokens=_count(headers.get("x-ratelimit-limit-tokens")),
        remaining_tokens=_count(headers.get("x-ratelimit-remaining-tokens")),
        reset_tokens_s=parse_duration(headers.get("x-ratelimit-reset-tokens")),
    )
    return None if found == _NO_LIMITS else found


class ServerRetryableError(RetryableError):
    """A retryable HTTP status (429, 5xx, …): also carries the response's rate-limit headers."""

    def __init__(self, message: str, *, ratelimit: RateLimits | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.ratelimit = ratelimit


def ratelimit_of(exc: BaseException) -> RateLimits | None:
    """The rate-limit headers an error came with, if it came from a response that had them."""
    return exc.ratelimit if isinstance(exc, ServerRetryableError) else None


#: An error answer's body that is not JSON.
_NOT_JSON = object()


def _error_body(response: httpx.Response) -> Any:
    """An error answer's body, parsed once for its message and its error object (``_NOT_JSON`` if it is not)."""
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return _NOT_JSON


def _server_message(response: httpx.Response, body: Any) -> str:
    if body is _NOT_JSON:
        msg: Any = response.text
    else:
        err = body.get("error", body) if isinstance(body, dict) else body
        msg = err.get("message") if isinstance(err, dict) else str(err)
    msg = " ".join(str(msg or "").split())
    return str(msg)[:300]


def _glimpse(response: httpx.Response) -> str:
    """The content type and the first words of a body that is not what was expected: the server's own words."""
    kind = response.headers.get("content-type", "no content type").split(";")[0]
    text = " ".join(response.content[:2000].decode("utf-8", "replace").split())
    return f"{kind}: {text[:120]!r}"


def _answered(exc: E, response: httpx.Response, body: Any, secret: str | None) -> E:
    """``exc`` with what the server said: its ``x-request-id`` and its ``error`` object, as JSON text
    (the key masked if the server quoted it), so the row's error line can carry them unchanged."""
    exc.request_id = response.headers.get("x-request-id")
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        text = orjson.dumps(body["error"]).decode()
        exc.server_error = text.replace(secret, "***") if secret else text
    return exc


def _constant(value: float) -> Callable[[], float]:
    return lambda: value


def _completion(response: httpx.Response) -> dict[str, Any]:
    """A 200's body as a chat completion; anything else (a proxy's login page, an empty answer) is retryable."""
    try:
        data: Any = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise RetryableError(
            f"200 with a body that is not JSON ({_glimpse(response)}): a proxy or login page in front of the "
            "API? check endpoint.base_url",
            kind="bad_response",
            status_code=200,
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        raise RetryableError(
            f"200 without choices ({_glimpse(response)}): not a chat completion",
            kind="bad_response",
            status_code=200,
        )
    return data


#: Jobs with at most this many rows go through httpx's own connection pool (see the module docstring).
FEW_REQUESTS = 100


def default_transport(max_connections: int, *, tls: bool = True, few: bool = False) -> httpx.AsyncBaseTransport:
    """aiohttp under httpx's transport API, or httpx's own pool for a job of ``few`` requests. ``tls=False``
    (a plain ``http://`` server, e.g. the local API or a model server on this machine) skips loading the CA
    bundle: a connection that never does TLS needs no certificates, and loading them costs tens of
    milliseconds of start-up."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=None)
    if few:
        return httpx.AsyncHTTPTransport(limits=limits, verify=tls)
    from httpx_aiohttp import AiohttpTransport

    return AiohttpTransport(limits=limits, verify=tls)


class Client:
    """Sends request bodies to ``{base_url}/chat/completions`` with the key from the caller."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        key_source: str = "the API key",
        timeout_s: float = 600.0,
        connect_timeout_s: float = 10.0,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
        stall_s: float = 60.0,
        few_requests: bool = False,
    ) -> None:
        headers = {"content-type": "application/json", "user-agent": "seedbatch"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.key_source = key_source
        self._secret = api_key or None
        self.timeout_s = timeout_s
        self.stall_s = stall_s
        # Requests go straight to an httpx transport (httpx's public transport API), not through
        # ``AsyncClient.post``: the client layer's cookie jar, redirect loop, auth flow and request
        # building cost CPU on every request, and a batch client uses none of them.
        tls = not self.base_url.lower().startswith("http://")
        self._transport = transport or default_transport(max_connections, tls=tls, few=few_requests)
        self._url = httpx.URL(self.url)
        self._headers = headers
        self._timeouts = httpx.Timeout(timeout_s, connect=connect_timeout_s, pool=None).as_dict()

    async def send(
        self,
        body: bytes,
        timeout_s: float | None = None,
        *,
        stream: bool = False,
        stall_s: float | Callable[[], float] | None = None,
    ) -> Reply:
        """POST one body; ``timeout_s`` overrides the client's timeout for this call (never above it).

        With ``stream`` the answer comes as server-sent events (``stream_options.include_usage`` asked
        for) and is put back together into the shape of a plain answer; no chunk for ``stall_s``
        (default: the client's; a callable is read again while waiting, so a limit learned meanwhile
        applies to streams already open) is a ``RetryableError(kind="stall")``.
        """
        started = time.perf_counter()
        asked = body
        if stream:
            body = streaming_body(body)
        streamed: dict[str, Any] | None = None
        limit = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        timeouts = self._timeouts if timeout_s is None else {**self._timeouts, "read": limit, "write": limit}
        given = self.stall_s if stall_s is None else stall_s
        stall = given if callable(given) else _constant(given)
        if stream:  # the response's first bytes are bounded by the stall time too
            timeouts = {**timeouts, "read": min(stall(), limit)}
        try:
            async with asyncio.timeout(limit):
                request = httpx.Request(
                    "POST", self._url, headers=self._headers, content=body, extensions={"timeout": timeouts}
                )
                response = await self._transport.handle_async_request(request)
                try:
                    if stream and response.status_code == 200 and is_sse(response):
                        streamed = await read_events(response, stall)
                    else:
                        await response.aread()
                finally:
                    await response.aclose()
        except TimeoutError:
            raise RetryableError(f"no answer within {limit:g}s", kind="timeout", sent=True) from None
        except httpx.TransportError as exc:
            raise self._transport_error(exc, stream) from None
        latency_ms = (time.perf_counter() - started) * 1000.0
        if response.status_code != 200:
            raise self._refused(response)
        request_id = response.headers.get("x-request-id")
        data = streamed if streamed is not None else _completion(response)
        return Reply(data, latency_ms, parse_rate_limits(response.headers), request_id, asked)

    def _refused(self, response: httpx.Response) -> Exception:
        """The error a non-200 answer is, on the error tree: fatal, retryable or final for the row."""
        status = response.status_code
        said = _error_body(response)
        message = _server_message(response, said)
        if self._secret and self._secret in message:
            # Some servers quote the rejected key back; it must not reach logs or the ledger.
            message = message.replace(self._secret, "***")
        if status in FATAL_STATUS:
            hint = f"; check {self.key_source}" if status in (401, 403) else "; check model.name and endpoint.base_url"
            return FatalAPIError(
                f"{status} from {self.base_url}: {FATAL_STATUS[status]}{hint} (server said: {message or 'nothing'})",
                status_code=status,
            )
        error: RequestError
        if status == 500 and _REQUEST_VALIDATION.search(message):
            # llama-cpp-python answers a request its schema rejects (e.g. response_format json_schema)
            # with 500 "N validation error(s): ... 'loc': ('body', ...)": the same bytes fail again.
            error = RowError(f"HTTP {status}: {message}", status_code=status, kind="http_500_invalid_request")
        elif status in RETRYABLE_STATUS or status >= 500:
            error = ServerRetryableError(
                f"HTTP {status}: {message}",
                status_code=status,
                kind=f"http_{status}",
                retry_after=parse_retry_after(response.headers),
                ratelimit=parse_rate_limits(response.headers),
            )
        else:
            error = RowError(f"HTTP {status}: {message}", status_code=status, kind=f"http_{status}")
        return _answered(error, response, said, self._secret)

    def _transport_error(self, exc: httpx.TransportError, stream: bool) -> Exception:
        """A transport failure on the error tree, with its cause in a user's words where it is known."""
        found = connect_cause(exc, self._url)
        if found is not None:
            words, permanent = found
            if permanent:
                return FatalAPIError(f"cannot connect to {self.base_url}: {words}", status_code=None)
            return RetryableError(words, kind="connect", sent=False)
        sent = was_sent(exc)
        if isinstance(exc, httpx.TimeoutException):
            kind = ("stall" if stream and isinstance(exc, httpx.ReadTimeout) else "timeout") if sent else "connect"
            return RetryableError(f"{kind}: {type(exc).__name__}", kind=kind, sent=sent)
        kind = "connection" if sent else "connect"
        return RetryableError(f"{kind} failed: {type(exc).__name__}", kind=kind, sent=sent)

    async def aclose(self) -> None:
        await self._transport.aclose()
