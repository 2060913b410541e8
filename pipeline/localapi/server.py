"""The local API over real HTTP: ``handler``'s answers served by aiohttp on 127.0.0.1.

Tests, benchmarks, Ray runs and ``seedbatch serve`` talk to it over sockets, so they exercise the
client's real HTTP path (connections, drops, timeouts); what the API answers lives in ``handler``.

``LocalAPI`` runs a server in a background thread (tests; a Ray run with the ``local`` preset);
``run_server`` blocks in the calling process (``seedbatch serve``, benchmarks).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pipeline.localapi.handler import MAX_BODY_BYTES, Dropped, Handler, Reply, ServerConfig, Stream
from pipeline.localapi.limits import Clock

_JSON = "application/json"


class _Server:
    """A ``Handler`` behind aiohttp: the routes, each outcome as HTTP, and the server's lifecycle."""

    def __init__(self, config: ServerConfig, clock: Clock = time.monotonic) -> None:
        self.handler = Handler(config, clock)

    @property
    def config(self) -> ServerConfig:
        return self.handler.config

    @config.setter
    def config(self, value: ServerConfig) -> None:
        self.handler.config = value

    def snapshot(self) -> dict[str, Any]:
        return self.handler.snapshot()

    def reset(self) -> None:
        self.handler.reset()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{name:.+}", self.model)  # ids hold slashes: bytedance/dola-seed-2-0-lite
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
        self.handler.hangs.cancel_all()
        await runner.cleanup()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type=_JSON)

    async def stats_view(self, request: web.Request) -> web.Response:
        return web.Response(body=self.handler.stats_body(), content_type=_JSON)

    async def reset_view(self, request: web.Request) -> web.Response:
        self.reset()
        return web.Response(body=b'{"ok":true}', content_type=_JSON)

    async def models(self, request: web.Request) -> web.Response:
        return _response(self.handler.models(request.headers))

    async def model(self, request: web.Request) -> web.Response:
        return _response(self.handler.model(request.headers, request.match_info["name"]))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        outcome = await self.handler.chat(request.headers, await request.read())
        if isinstance(outcome, Dropped):
            if request.transport is not None:
                request.transport.close()
            await self.handler.hangs.hang()  # until aiohttp cancels the handler of the closed connection
            raise ConnectionResetError("the local API dropped the connection")
        if isinstance(outcome, Stream):
            response = web.StreamResponse(headers=outcome.headers)
            await response.prepare(request)
            async for event in self.handler.events(outcome):
                await response.write(event)
            await response.write_eof()
            return response
        return _response(outcome)


def _response(reply: Reply) -> web.Response:
    if reply.headers and "Content-Type" in reply.headers:  # aiohttp takes the type once: a header or the argument
        return web.Response(status=reply.status, body=reply.body, headers=reply.headers)
    return web.Response(status=reply.status, body=reply.body, content_type=_JSON, headers=reply.headers)


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
