"""The built-in local API: an OpenAI/AIML-compatible ``/v1/chat/completions``.

Demos, tests, benchmarks and users' dry runs exercise the client against it without paying: answers
are deterministic functions of the messages, usage and ``meta.usage`` follow the AIML API's shape, and
every failure a provider can produce (429 with headers, 5xx, dropped connections, hangs, broken or
off-schema JSON, refusals, truncation) can be switched on at a chosen rate.

One module per job: ``validation`` (what a 400 is; prompt tokens), ``answers`` and ``documents``
(what a 200 says), ``truth`` (right answers, and wrong ones at a set rate, for evaluations),
``streaming`` (a 200 as server-sent events), ``limits`` (RPM/TPM over 1-second windows, with an
injectable clock), ``faults`` (what goes wrong, and when), ``handler`` (one request in, one outcome
out), ``endpoint`` (where a run sends: the job's server or this API), and the handler's two front ends:
``server`` (aiohttp on 127.0.0.1: ``seedbatch serve``, ``LocalAPI`` in tests) and ``inprocess`` (an
httpx transport: a ``preset = "local"`` run in this process). Neither imports polars; only ``server``
imports aiohttp, and it loads on first use of ``LocalAPI`` or ``run_server``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.localapi.faults import REFUSE_MARKER, STATUS_MARKER
from pipeline.localapi.handler import API_MODEL_ID, KNOWN_MODELS, MAX_BODY_BYTES, MISSING_MODEL, ServerConfig
from pipeline.localapi.limits import RateLimits
from pipeline.localapi.validation import PRIMING_TOKENS, TOKEN_RE

if TYPE_CHECKING:
    from pipeline.localapi.server import LocalAPI, run_server

__all__ = [
    "API_MODEL_ID",
    "KNOWN_MODELS",
    "MAX_BODY_BYTES",
    "MISSING_MODEL",
    "PRIMING_TOKENS",
    "REFUSE_MARKER",
    "STATUS_MARKER",
    "TOKEN_RE",
    "LocalAPI",
    "RateLimits",
    "ServerConfig",
    "run_server",
]


def __getattr__(name: str) -> Any:
    if name in ("LocalAPI", "run_server"):  # aiohttp loads only for a server on a socket
        from pipeline.localapi import server

        return getattr(server, name)
    raise AttributeError(f"module 'pipeline.localapi' has no attribute {name!r}")
