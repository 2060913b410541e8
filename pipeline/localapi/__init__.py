"""The built-in local API: an OpenAI/AIML-compatible ``/v1/chat/completions`` on 127.0.0.1.

Demos, tests, benchmarks and users' dry runs exercise the real HTTP path against it without paying:
answers are deterministic functions of the messages, usage and ``meta.usage`` follow the AIML API's
shape, and every failure a provider can produce (429 with headers, 5xx, dropped connections, hangs,
broken or off-schema JSON, refusals, truncation) can be switched on at a chosen rate.

One module per job: ``validation`` (what a 400 is; prompt tokens), ``answers`` and ``documents``
(what a 200 says), ``limits`` (RPM/TPM over 1-second windows, with an injectable clock), ``faults``
(what goes wrong, and when), ``server`` (aiohttp app and lifecycle). This package imports aiohttp but
not polars, so ``seedbatch serve`` and a ``LocalAPI`` in a test start quickly.
"""

from __future__ import annotations

from pipeline.localapi.faults import REFUSE_MARKER, STATUS_MARKER
from pipeline.localapi.limits import RateLimits
from pipeline.localapi.server import API_MODEL_ID, MAX_BODY_BYTES, MISSING_MODEL, LocalAPI, ServerConfig, run_server
from pipeline.localapi.validation import PRIMING_TOKENS, TOKEN_RE

__all__ = [
    "API_MODEL_ID",
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
