"""Why a connection failed, in words a user can act on, and whether the server may have got the request.

httpx and aiohttp wrap the socket's own words (a refused connection, an unknown host, TLS spoken to a
plain-HTTP server) in their own exception types; the cause is read from the whole chain of messages.
"""

from __future__ import annotations

import re

import httpx

__all__ = ["connect_cause", "was_sent"]


def was_sent(exc: BaseException) -> bool:
    """Whether the server may have received the request (and so may bill it)."""
    if isinstance(exc, httpx.ConnectError | httpx.PoolTimeout):
        return False
    cause = exc.__cause__ or exc.__context__
    if cause is not None and type(cause).__module__.startswith("aiohttp"):
        # aiohttp maps every ClientConnectionError to ConnectTimeout; only a failed connect was never sent.
        return not type(cause).__name__.startswith("ClientConnector")
    return not isinstance(exc, httpx.ConnectTimeout)


#: What a failed connection's own words mean, in words a user can act on: (pattern, cause, permanent).
#: A permanent cause (TLS spoken to a plain-HTTP server, an untrusted certificate) fails every request
#: the same way, so the run stops at once instead of retrying it.
_CONNECT_CAUSES: tuple[tuple[re.Pattern[str], str, bool], ...] = (
    (
        re.compile(r"WRONG_VERSION_NUMBER|wrong version number|record layer failure|packet length too long", re.I),
        "the server at {where} speaks plain HTTP, not TLS: use http:// in endpoint.base_url",
        True,
    ),
    (
        re.compile(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed|self.signed certificate", re.I),
        "the TLS certificate of {where} is not trusted (self-signed or an unknown CA); use a trusted certificate "
        "or set SSL_CERT_FILE to the CA bundle that signs it",
        True,
    ),
    (
        re.compile(
            r"Name or service not known|nodename nor servname|Temporary failure in name resolution|"
            r"No address associated|getaddrinfo failed|Errno -[235]\]",
            re.I,
        ),
        "host name not found: {host} (check endpoint.base_url)",
        False,
    ),
    (
        re.compile(r"Connect call failed|Connection refused|Errno 111\]|All connection attempts failed", re.I),
        "connection refused at {where}: nothing listens there (is the server running, is endpoint.base_url right?)",
        False,
    ),
)


def _chain_text(exc: BaseException) -> str:
    """The messages of ``exc`` and what caused it (httpx and aiohttp wrap the socket's own words)."""
    parts, seen = [], 0
    current: BaseException | None = exc
    while current is not None and seen < 6:
        parts.append(str(current))
        current = current.__cause__ or current.__context__
        seen += 1
    return " | ".join(parts)


def connect_cause(exc: BaseException, url: httpx.URL) -> tuple[str, bool] | None:
    """Why a connection failed, as a line a user can act on, and whether it is permanent; None if unknown."""
    text = _chain_text(exc)
    port = url.port or (443 if url.scheme == "https" else 80)
    where = f"{url.host}:{port}"
    for pattern, words, permanent in _CONNECT_CAUSES:
        if pattern.search(text):
            return words.format(where=where, host=url.host), permanent
    return None
