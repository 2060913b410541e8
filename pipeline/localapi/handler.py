"""The local API without a web framework: one request in, one ``Outcome`` out.

It exists so demos, tests, benchmarks and users' dry runs exercise the client, retries, rate limits
and ledger without paying. ``Handler.chat`` only wires the parts, in the order a provider applies
them: auth, unknown model, rate limits (``limits``), request validation (``validation``), marker and
random faults (``faults``), latency, then the deterministic answer (``answers``). It has to keep up
with the pipeline at thousands of requests per second on one core, so the request path avoids anything
heavier than one ``orjson`` parse, one regex pass and one hash.

Two front ends serve it: ``server`` over real HTTP with aiohttp (``seedbatch serve``, ``LocalAPI`` in
tests, Ray runs), and ``inprocess`` as an httpx transport for a ``preset = "local"`` run in this
process: a dry run then needs no web server, whose import and thread would outweigh a small job's
own work. Nothing here imports aiohttp.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import math
import os
import random
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from pipeline.job.spec import DEFAULT_MODEL, LOCAL_MODEL
from pipeline.localapi import streaming, truth
from pipeline.localapi.answers import Answer, Answerer, completion, refusal, truncate, usd_for
from pipeline.localapi.faults import Fault, Faults, Hangs, Systematic, marker_status, wants_refusal
from pipeline.localapi.limits import Clock, RateLimits, Verdict, request_tokens
from pipeline.localapi.validation import BadRequest, Parsed, parse

#: Request headers as either front end has them (both look names up case-insensitively).
Headers = Mapping[str, str]

#: The model id the AIML API documents (the jobs' default model); listed by ``/v1/models``.
API_MODEL_ID = DEFAULT_MODEL
#: The models the local API serves unless told otherwise: the jobs' default and the name it answers with.
#: A request naming any other model gets OpenAI's 404 ``model_not_found``, so a misspelled
#: ``model.name`` meets the same fatal stop against the local API as against a provider.
KNOWN_MODELS = (API_MODEL_ID, LOCAL_MODEL)
#: A name the local API never serves: tests use it to reach the "every row would fail" path.
MISSING_MODEL = "missing-model"
#: When the local API's models were published (``created`` of each ``/v1/models`` entry).
_MODELS_CREATED = 1_767_225_600
MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass
class ServerConfig:
    """How the local API behaves; mutable so a test can change fault rates between runs.

    ``rpm``/``tpm`` are per-minute limits enforced over ``burst_s``-second windows (see ``limits``).
    ``hang_rate`` requests hang for ``hang_s`` seconds and then answer normally, or until the client
    gives up when ``hang_s`` is None. Prices are the local model's own (USD per million tokens).
    """

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    rpm: float | None = None
    tpm: float | None = None
    burst_s: float = 1.0
    fail_5xx_rate: float = 0.0
    drop_rate: float = 0.0
    hang_rate: float = 0.0
    hang_s: float | None = None
    invalid_json_rate: float = 0.0
    invalid_arguments_rate: float = 0.0
    """Fraction of function calls whose arguments come back malformed: cut short, off-schema or fenced."""
    require_key: str | None = None
    input_per_million: float = 0.25
    output_per_million: float = 2.0
    seed: int = 0
    model_name: str = LOCAL_MODEL
    # Systematic failure: every request, not a random share (``faults.Systematic``).
    revoke_key_after: int | None = None
    """After this many 200 answers every request gets 401 (a key revoked mid-run)."""
    fail_status: int | None = None
    """Every chat request is answered with this status: 503 (a provider down), 200 with ``fail_body``."""
    fail_body: str = "json"
    """What those answers say: ``json`` (an error object), ``html`` (a login page), ``no_choices`` (a JSON
    200 without ``choices``), or any other text as the error message (e.g. a gateway's ``No connected db.``)."""
    fail_for_s: float | None = None
    """The failing ends this many seconds after its first answer (an outage that recovers); None: never."""
    ratelimit_headers: bool = True
    """Send ``x-ratelimit-*`` headers; False: a gateway that says nothing of its limit."""
    retry_after: bool = True
    """429s carry ``Retry-After``; False: a gateway that says nothing of when to retry."""
    advertised_rpm: float | None = None
    """Headers claim this request limit instead of the enforced one (a gateway passing its upstream's headers)."""
    models: tuple[str, ...] = KNOWN_MODELS
    """The model ids requests may name (``/v1/models`` lists them); any other is a 404 ``model_not_found``."""
    field_error_rates: dict[str, float] = field(default_factory=dict)
    """Field → share of answers whose field is wrong (``truth``): a known error rate for evaluations."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole JSON answer."""

    status: int
    body: bytes
    headers: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Stream:
    """A 200 sent as server-sent events (``Handler.events`` sends them, stalling when asked)."""

    events: list[bytes]
    headers: dict[str, str] | None
    #: Held after the first event for this long (None: until the client gives up); 0.0: no stall.
    stall_s: float | None


@dataclass(frozen=True, slots=True)
class Dropped:
    """The connection is cut without an answer (the ``drop`` fault)."""


Outcome = Reply | Stream | Dropped


def _error(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    body = orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})
    return Reply(status, body, headers)


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": _MODELS_CREATED, "owned_by": "seedbatch-local"}


def _model_not_found(name: str) -> Reply:
    message = f"The model '{name}' does not exist or you do not have access to it."
    return _error(404, message, "invalid_request_error", "model", "model_not_found")


class Handler:
    """Counters, limiters and answers of one local API; lives on one event loop, so no locks."""

    def __init__(self, config: ServerConfig, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()
        self.answerer = Answerer()
        self.hangs = Hangs()
        self.reset()

    def reset(self) -> None:
        """Zero the counters and start the random faults and the rate limits afresh."""
        self.received = 0
        self.answered_ok = 0
        self.by_status: dict[int, int] = {}
        self.dropped = 0
        self.hung = 0
        self.rate_limited = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.usd_spent = 0.0
        self.ok_by_hash: dict[bytes, int] = {}
        self.faults = Faults(self.config.seed)
        self.jitter_rng = random.Random(self.config.seed + 1)
        self._limit_key: tuple[float | None, float | None, float] | None = None
        self.limits: RateLimits | None = None
        self.systematic = Systematic(self.clock)

    def snapshot(self) -> dict[str, Any]:
        ok = {digest.hex(): n for digest, n in self.ok_by_hash.items()}
        return {
            "received": self.received,
            "answered_ok": self.answered_ok,
            "by_status": dict(self.by_status),
            "dropped": self.dropped,
            "hung": self.hung,
            "rate_limited": self.rate_limited,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "usd_spent": self.usd_spent,
            "ok_by_body_hash": ok,
            "duplicates": sum(n - 1 for n in ok.values()),
        }

    # -- small endpoints

    def stats_body(self) -> bytes:
        return orjson.dumps(self.snapshot(), option=orjson.OPT_NON_STR_KEYS)

    def models(self, headers: Headers) -> Reply:
        denied = self._auth(headers)
        if denied is not None:
            return denied
        data = {"object": "list", "data": [_model(name) for name in self.config.models]}
        return Reply(200, orjson.dumps(data))

    def model(self, headers: Headers, name: str) -> Reply:
        """``GET /v1/models/{name}``: the model object, or the 404 OpenAI answers for a model it does not serve."""
        denied = self._auth(headers)
        if denied is not None:
            return denied
        if name not in self.config.models:
            return _model_not_found(name)
        return Reply(200, orjson.dumps(_model(name)))

    def _auth(self, headers: Headers) -> Reply | None:
        key = self.config.require_key
        if key is None:
            return None
        given = headers.get("Authorization") or ""
        if hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return None
        message = (
            "Incorrect API key provided. Pass 'Authorization: Bearer <key>' with the key the local API "
            "was started with."
            if given
            else "Missing API key: send 'Authorization: Bearer <key>'."
        )
        return _error(401, message, "invalid_request_error", code="invalid_api_key")

    def _revoked(self, cfg: ServerConfig) -> Reply | None:
        if cfg.revoke_key_after is None or self.answered_ok < cfg.revoke_key_after:
            return None
        return _error(401, "The API key was revoked.", "invalid_request_error", code="invalid_api_key")

    # -- chat completions

    def _count(self, status: int) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1

    async def chat(self, headers_in: Headers, raw: bytes) -> Outcome:
        """One ``POST /v1/chat/completions``: ``raw`` is the request body as sent.

        Every answer, error or not, carries ``x-request-id`` as OpenAI's do: Batch output lines quote it.
        """
        outcome = await self._chat(headers_in, raw)
        if isinstance(outcome, Dropped):
            return outcome
        headers = {**(outcome.headers or {}), "x-request-id": f"req_{self._id_prefix}{next(self._request_ids):016x}"}
        return replace(outcome, headers=headers)

    async def _chat(self, headers_in: Headers, raw: bytes) -> Outcome:
        self.received += 1
        cfg = self.config
        denied = self._before_reading(headers_in, cfg)
        if denied is not None:
            return denied
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        model = body.get("model") if isinstance(body, dict) else None
        if isinstance(model, str) and model and model not in cfg.models:
            self._count(404)
            return _model_not_found(model)
        parsed: Parsed | None = None
        bad: BadRequest | None = None
        try:
            parsed = parse(body)
        except BadRequest as exc:
            bad = exc
        answer: Answer | None = None
        headers: dict[str, str] | None = None
        if cfg.rpm is not None or cfg.tpm is not None:
            limited, answer, headers = self._rate_limit(cfg, parsed, len(raw))
            if limited is not None:
                return limited
        if parsed is None:
            assert bad is not None
            self._count(400)
            return _error(400, bad.message, "invalid_request_error", bad.param, headers=headers)
        marked = self._marker_error(parsed, headers)
        if marked is not None:
            return marked
        faulted, stall = await self._fault(cfg, parsed, headers)
        if faulted is not None:
            return faulted
        if cfg.latency_ms > 0 or cfg.latency_jitter_ms > 0:
            jitter = self.jitter_rng.uniform(-cfg.latency_jitter_ms, cfg.latency_jitter_ms)
            await asyncio.sleep(max(cfg.latency_ms + jitter, 0.0) / 1000.0)
        body_hash = hashlib.sha256(raw).digest()
        data = self._ok(cfg, parsed, self._answer(cfg, parsed, answer, body_hash), body_hash)
        if parsed.stream:
            events = streaming.events(data, parsed.include_usage)
            return Stream(
                events, {**(headers or {}), "Content-Type": "text/event-stream"}, cfg.hang_s if stall else 0.0
            )
        return Reply(200, orjson.dumps(data), headers)

    def _before_reading(self, headers_in: Headers, cfg: ServerConfig) -> Reply | None:
        """A 401 (no key, the wrong key, a revoked key) or the failure every request gets (``--fail-status``)."""
        denied = self._auth(headers_in) or self._revoked(cfg)
        if denied is not None:
            self._count(401)
            return denied
        failing = self.systematic.failing(cfg)
        if failing is not None:
            self._count(failing[0])
            return Reply(failing[0], failing[1], {"Content-Type": failing[2]})
        return None

    def _rate_limit(
        self, cfg: ServerConfig, parsed: Parsed | None, raw_len: int
    ) -> tuple[Reply | None, Answer | None, dict[str, str]]:
        """A 429 when the request is over RPM/TPM, else None; the answer when TPM needed it built; the headers.

        Checked before the body's validity: an invalid request uses up a request too.
        """
        answer: Answer | None = None
        if parsed is not None and cfg.tpm is not None and parsed.max_tokens is None:
            answer = self.answerer.answer(parsed)  # TPM counts the real completion: build it first
        verdict = self._limit(cfg, parsed, answer, raw_len)
        headers = verdict.headers
        if verdict.admitted:
            return None, answer, headers
        self._count(429)
        self.rate_limited += 1
        message = f"Rate limit reached for {verdict.limit} on the local API; retry after {math.ceil(verdict.wait_s)}s."
        return _error(429, message, verdict.limit, None, "rate_limit_exceeded", headers), answer, headers

    def _marker_error(self, parsed: Parsed, headers: dict[str, str] | None) -> Reply | None:
        """The status a ``[[status:NNN]]`` marker in the last user message asks for, else None."""
        status = marker_status(parsed.last_user)
        if status is None:
            return None
        self._count(status)
        if status == 429:
            self.rate_limited += 1
        kind = "invalid_request_error" if status < 500 else "server_error"
        return _error(
            status,
            f"Simulated HTTP {status} requested by a [[status:{status}]] marker.",
            kind,
            headers={**(headers or {}), "Retry-After": "1"} if status in (429, 503) else headers,
        )

    async def _fault(
        self, cfg: ServerConfig, parsed: Parsed, headers: dict[str, str] | None
    ) -> tuple[Outcome | None, bool]:
        """The random faults: a dropped connection or a 5xx (returned), a hang (waited out here; a stream
        instead stalls after its first chunk, as a stuck generation does: the second value)."""
        roll = self.faults.roll(cfg.drop_rate, cfg.hang_rate, cfg.fail_5xx_rate)
        if roll.fault is Fault.DROP:
            self.dropped += 1
            return Dropped(), False
        if roll.fault is Fault.HANG:
            self.hung += 1
            if parsed.stream:
                return None, True
            await self.hangs.hang(cfg.hang_s)  # a finite hang then answers normally
        elif roll.fault is Fault.SERVER_ERROR:
            self._count(roll.status)
            message = "The local API simulated a server error; retry the request."
            return _error(roll.status, message, "server_error", headers=headers), False
        return None, False

    def _answer(self, cfg: ServerConfig, parsed: Parsed, built: Answer | None, body_hash: bytes) -> Answer:
        """The answer to send: a refusal when asked for one, else the deterministic answer (``built`` when
        the rate limit already built it) with the wrong fields, broken JSON and truncation asked for."""
        if wants_refusal(parsed.last_user):
            return refusal()
        answer = built if built is not None else self.answerer.answer(parsed)
        truth.apply(answer, parsed, body_hash, cfg.field_error_rates)
        if parsed.fmt != "text" and cfg.invalid_json_rate > 0:
            broken = self.faults.corrupt(answer.content or "", parsed.schema, body_hash, cfg.invalid_json_rate)
            if broken is not None:
                answer.set_content(broken)
        if answer.tool_calls and parsed.tools and cfg.invalid_arguments_rate > 0:
            call = answer.tool_calls[0]
            schema = parsed.tools[call["name"]]
            broken = self.faults.corrupt(call["arguments"], schema, body_hash, cfg.invalid_arguments_rate)
            if broken is not None:
                answer.set_arguments(0, broken)
        truncate(answer, parsed.max_tokens)
        return answer

    async def events(self, stream: Stream) -> AsyncIterator[bytes]:
        """``stream``'s events in order; a stalled stream holds after its first, as a stuck generation does."""
        for i, event in enumerate(stream.events):
            yield event
            if i == 0 and stream.stall_s != 0.0:
                await self.hangs.hang(stream.stall_s)

    def _limit(self, cfg: ServerConfig, parsed: Parsed | None, answer: Answer | None, raw_len: int) -> Verdict:
        """Admit or refuse one request; the buckets are rebuilt (full) when the limits change."""
        key = (cfg.rpm, cfg.tpm, cfg.burst_s)
        if self.limits is None or key != self._limit_key:
            self._limit_key = key
            self.limits = RateLimits(cfg.rpm, cfg.tpm, cfg.burst_s, self.clock)
        completion_tokens = answer.content_tokens + answer.reasoning_tokens if answer is not None else 0
        tokens = request_tokens(
            parsed.prompt_tokens if parsed is not None else None,
            parsed.max_tokens if parsed is not None else None,
            completion_tokens,
            raw_len,
        )
        verdict = self.limits.check(tokens)
        if not cfg.ratelimit_headers:
            for name in [n for n in verdict.headers if n.startswith("x-ratelimit-")]:
                del verdict.headers[name]
        elif cfg.advertised_rpm is not None:
            verdict.headers["x-ratelimit-limit-requests"] = str(int(cfg.advertised_rpm))
            verdict.headers["x-ratelimit-remaining-requests"] = str(int(cfg.advertised_rpm) - 1)
        if not cfg.retry_after:
            verdict.headers.pop("Retry-After", None)
            verdict.headers.pop("retry-after-ms", None)
        return verdict

    def _ok(self, cfg: ServerConfig, parsed: Parsed, answer: Answer, body_hash: bytes) -> dict[str, Any]:
        """The answer as a ``chat.completion``, counted as answered (billed) whether it goes plain or streamed."""
        completion_tokens = answer.content_tokens + answer.reasoning_tokens
        prompt = parsed.prompt_tokens
        usd = usd_for(prompt, completion_tokens, cfg.input_per_million, cfg.output_per_million)
        response_id = f"chatcmpl-local-{self._id_prefix}{next(self._ids):016x}"
        data = completion(response_id, cfg.model_name, prompt, answer, usd)
        if parsed.logprobs:
            data["choices"][0]["logprobs"] = truth.logprobs(answer, body_hash, parsed.top_logprobs)
        self._count(200)
        self.answered_ok += 1
        self.prompt_tokens += prompt
        self.completion_tokens += completion_tokens
        self.usd_spent += usd
        self.ok_by_hash[body_hash] = self.ok_by_hash.get(body_hash, 0) + 1
        return data
