"""The local API's HTTP side: the aiohttp app, its handlers and the server's lifecycle.

It exists so demos, tests, benchmarks and users' dry runs exercise the real HTTP path (client, retries,
rate limits, ledger) without paying. This module only wires the parts, in the order a provider applies
them: auth, unknown model, rate limits (``limits``), request validation (``validation``), marker and
random faults (``faults``), latency, then the deterministic answer (``answers``). It has to keep up
with the pipeline at thousands of requests per second on one core, so the request path avoids anything
heavier than one ``orjson`` parse, one regex pass and one hash.

``LocalAPI`` runs a server in a background thread (tests, ``run_job`` with the ``local`` preset);
``run_server`` blocks in the calling process (``seedbatch serve``, benchmarks).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from pipeline.localapi import streaming
from pipeline.localapi.answers import Answer, Answerer, completion, refusal, truncate, usd_for
from pipeline.localapi.faults import Fault, Faults, Hangs, marker_status, wants_refusal
from pipeline.localapi.limits import Clock, RateLimits, Verdict, request_tokens
from pipeline.localapi.validation import BadRequest, Parsed, parse
from pipeline.spec import DEFAULT_MODEL, LOCAL_MODEL

#: The model id the AIML API documents (the jobs' default model); listed by ``/v1/models``. Any other
#: name is accepted too.
API_MODEL_ID = DEFAULT_MODEL
#: Requests naming this model get 404, so tests can reach the "every row would fail" path.
MISSING_MODEL = "missing-model"
MAX_BODY_BYTES = 64 * 1024 * 1024
_JSON = "application/json"


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


def _error(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})
    return web.Response(status=status, body=body, content_type=_JSON, headers=headers)


class _Server:
    """Counters, limiters and handlers of one server; lives on one event loop, so no locks."""

    def __init__(self, config: ServerConfig, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._ids = itertools.count(1)
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

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/_stats", self.stats_view)
        app.router.add_post("/_reset", self.reset_view)
        app.router.add_get("/health", self.health)
        return app

    async def start(self, host: str, port: int) -> tuple[web.AppRunner, str]:
        # handler_cancellation: a client giving up must end its hang/latency sleep, as on a real server.
        runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=4096)
        await site.start()
        addresses = runner.addresses
        bound = addresses[0][1] if addresses else port
        shown = f"[{host}]" if ":" in host else host
        return runner, f"http://{shown}:{bound}/v1"

    async def close(self, runner: web.AppRunner) -> None:
        self.hangs.cancel_all()
        await runner.cleanup()

    # -- small endpoints

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type=_JSON)

    async def stats_view(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.snapshot(), option=orjson.OPT_NON_STR_KEYS), content_type=_JSON)

    async def reset_view(self, request: web.Request) -> web.Response:
        self.reset()
        return web.Response(body=b'{"ok":true}', content_type=_JSON)

    async def models(self, request: web.Request) -> web.Response:
        denied = self._auth(request)
        if denied is not None:
            return denied
        data = {
            "object": "list",
            "data": [{"id": API_MODEL_ID, "object": "model", "created": 1_767_225_600, "owned_by": "seedbatch-local"}],
        }
        return web.Response(body=orjson.dumps(data), content_type=_JSON)

    def _auth(self, request: web.Request) -> web.Response | None:
        key = self.config.require_key
        if key is None:
            return None
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return None
        message = (
            "Incorrect API key provided. Pass 'Authorization: Bearer <key>' with the key the local API "
            "was started with."
            if given
            else "Missing API key: send 'Authorization: Bearer <key>'."
        )
        return _error(401, message, "invalid_request_error", code="invalid_api_key")

    # -- chat completions

    def _count(self, status: int) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.received += 1
        cfg = self.config
        denied = self._auth(request)
        if denied is not None:
            self._count(401)
            return denied
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if isinstance(body, dict) and body.get("model") == MISSING_MODEL:
            self._count(404)
            return _error(
                404,
                f"The model '{MISSING_MODEL}' does not exist or you do not have access to it.",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        parsed: Parsed | None = None
        bad: BadRequest | None = None
        try:
            parsed = parse(body)
        except BadRequest as exc:
            bad = exc
        answer: Answer | None = None
        headers: dict[str, str] | None = None
        if cfg.rpm is not None or cfg.tpm is not None:
            if parsed is not None and cfg.tpm is not None and parsed.max_tokens is None:
                answer = self.answerer.answer(parsed)  # TPM counts the real completion: build it first
            verdict = self._limit(cfg, parsed, answer, len(raw))
            headers = verdict.headers
            if not verdict.admitted:
                self._count(429)
                self.rate_limited += 1
                return _error(
                    429,
                    f"Rate limit reached for {verdict.limit} on the local API; retry after {headers['Retry-After']}s.",
                    verdict.limit,
                    None,
                    "rate_limit_exceeded",
                    headers,
                )
        if parsed is None:
            assert bad is not None
            self._count(400)
            return _error(400, bad.message, "invalid_request_error", bad.param, headers=headers)
        status = marker_status(parsed.last_user)
        if status is not None:
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

        roll = self.faults.roll(cfg.drop_rate, cfg.hang_rate, cfg.fail_5xx_rate)
        stall = False
        if roll.fault is Fault.DROP:
            self.dropped += 1
            if request.transport is not None:
                request.transport.close()
            await self.hangs.hang()
        elif roll.fault is Fault.HANG:
            self.hung += 1
            if parsed.stream:
                stall = True  # a stream stalls after its first chunk, as a stuck generation does
            else:
                await self.hangs.hang(cfg.hang_s)  # a finite hang then answers normally
        elif roll.fault is Fault.SERVER_ERROR:
            self._count(roll.status)
            message = "The local API simulated a server error; retry the request."
            return _error(roll.status, message, "server_error", headers=headers)

        if cfg.latency_ms > 0 or cfg.latency_jitter_ms > 0:
            jitter = self.jitter_rng.uniform(-cfg.latency_jitter_ms, cfg.latency_jitter_ms)
            await asyncio.sleep(max(cfg.latency_ms + jitter, 0.0) / 1000.0)

        body_hash = hashlib.sha256(raw).digest()
        if wants_refusal(parsed.last_user):
            answer = refusal()
        else:
            if answer is None:
                answer = self.answerer.answer(parsed)
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
        data = self._ok(cfg, parsed, answer, body_hash)
        if parsed.stream:
            return await self._stream(request, data, parsed.include_usage, headers, cfg.hang_s if stall else 0.0)
        return web.Response(body=orjson.dumps(data), content_type=_JSON, headers=headers)

    async def _stream(
        self,
        request: web.Request,
        data: dict[str, Any],
        include_usage: bool,
        headers: dict[str, str] | None,
        stall_s: float | None,
    ) -> web.StreamResponse:
        """Send ``data`` as server-sent events; ``stall_s`` (None: for ever) holds the stream after its first chunk."""
        response = web.StreamResponse(headers={**(headers or {}), "Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, event in enumerate(streaming.events(data, include_usage)):
            await response.write(event)
            if i == 0 and stall_s != 0.0:
                await self.hangs.hang(stall_s)
        await response.write_eof()
        return response

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
        return self.limits.check(tokens)

    def _ok(self, cfg: ServerConfig, parsed: Parsed, answer: Answer, body_hash: bytes) -> dict[str, Any]:
        """The answer as a ``chat.completion``, counted as answered (billed) whether it goes plain or streamed."""
        completion_tokens = answer.content_tokens + answer.reasoning_tokens
        prompt = parsed.prompt_tokens
        usd = usd_for(prompt, completion_tokens, cfg.input_per_million, cfg.output_per_million)
        response_id = f"chatcmpl-local-{self._id_prefix}{next(self._ids):016x}"
        data = completion(response_id, cfg.model_name, prompt, answer, usd)
        self._count(200)
        self.answered_ok += 1
        self.prompt_tokens += prompt
        self.completion_tokens += completion_tokens
        self.usd_spent += usd
        self.ok_by_hash[body_hash] = self.ok_by_hash.get(body_hash, 0) + 1
        return data


@dataclass
class _Running:
    loop: asyncio.AbstractEventLoop
    stop: asyncio.Event
    thread: threading.Thread
    base_url: str


class LocalAPI:
    """Runs the server on 127.0.0.1 in a background thread with its own event loop.

    A thread (not a process) so tests and ``run_job`` can start one in milliseconds and read its
    counters directly; benchmarks that need the pipeline's own core to themselves use ``run_server``.
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock = time.monotonic,
    ) -> None:
        """``clock`` drives the rate limits only (tests pass a hand-moved one); latency and hangs sleep for real."""
        self._server = _Server(config or ServerConfig(), clock)
        self.host = host
        self.port = port
        self._running: _Running | None = None

    @property
    def config(self) -> ServerConfig:
        return self._server.config

    @config.setter
    def config(self, value: ServerConfig) -> None:
        self._server.config = value

    @property
    def base_url(self) -> str:
        if self._running is None:
            raise RuntimeError("the local API is not running; call start() first")
        return self._running.base_url

    def start(self) -> str:
        if self._running is not None:
            return self._running.base_url
        started = threading.Event()
        box: dict[str, Any] = {}

        async def serve() -> None:
            runner, url = await self._server.start(self.host, self.port)
            stop = asyncio.Event()
            box["loop"], box["stop"], box["url"] = asyncio.get_running_loop(), stop, url
            started.set()
            try:
                await stop.wait()
            finally:
                await self._server.close(runner)

        def main() -> None:
            try:
                asyncio.run(serve())
            except BaseException as exc:
                box["error"] = exc
            finally:
                started.set()

        thread = threading.Thread(target=main, name="seedbatch-localapi", daemon=True)
        thread.start()
        started.wait()
        if "error" in box:
            thread.join()
            cause: BaseException = box["error"]
            raise RuntimeError(f"the local API could not start on {self.host}:{self.port}: {cause}") from cause
        self._running = _Running(box["loop"], box["stop"], thread, box["url"])
        return self._running.base_url

    def stop(self) -> None:
        running, self._running = self._running, None
        if running is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop may already be gone
            running.loop.call_soon_threadsafe(running.stop.set)
        running.thread.join(timeout=10)

    def __enter__(self) -> LocalAPI:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop: the counters belong to that thread, so no lock is needed."""
        running = self._running
        if running is None:
            return fn()

        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), running.loop).result(timeout=10)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._on_loop(self._server.snapshot)
        return result

    def reset(self) -> None:
        self._on_loop(self._server.reset)


def run_server(
    config: ServerConfig, host: str = "127.0.0.1", port: int = 8765, ready: Callable[[str], None] | None = None
) -> None:
    """Blocking; for `seedbatch serve` and benchmarks in a separate process.

    Calls ``ready(base_url)`` once listening, so a parent can wait for the line instead of polling.
    Stops on SIGINT/SIGTERM.
    """

    async def main() -> None:
        server = _Server(config)
        runner, url = await server.start(host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        try:
            if ready is not None:
                ready(url)
            await stop.wait()
        finally:
            await server.close(runner)

    asyncio.run(main())
