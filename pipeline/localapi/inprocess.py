"""The local API as an httpx transport: a ``preset = "local"`` run answered in its own process.

The client sends exactly what it sends to a server (method, path, headers, body) and gets an
``httpx.Response`` back, streamed when the request asked for ``stream: true``; only the socket is
missing. A dropped connection becomes the ``httpx.RemoteProtocolError`` a real one raises, a hang an
await the client's deadline cancels. The aiohttp server (``server``) stays for tests, benchmarks, Ray
and ``seedbatch serve``: there the socket is the point.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from pipeline.localapi.handler import Dropped, Handler, Reply, ServerConfig, Stream

#: The base URL a run shows for the in-process API (never resolved: no request leaves the process).
BASE_URL = "http://seedbatch-local/v1"

_JSON = {"content-type": "application/json"}


class _Events(httpx.AsyncByteStream):
    def __init__(self, events: AsyncIterator[bytes]) -> None:
        self._events = events

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for event in self._events:
            yield event


class InProcessTransport(httpx.AsyncBaseTransport):
    """Routes ``/v1/chat/completions``, ``/v1/models`` and ``/v1/models/{id}`` to a ``Handler`` on the caller's loop."""

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.handler = Handler(config or ServerConfig())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST" and path.endswith("/chat/completions"):
            outcome = await self.handler.chat(request.headers, await request.aread())
        elif request.method == "GET" and path.endswith("/models"):
            outcome = self.handler.models(request.headers)
        elif request.method == "GET" and "/models/" in path:
            outcome = self.handler.model(request.headers, path.split("/models/", 1)[1])
        else:
            outcome = Reply(404, b'{"error":{"message":"Not Found","type":"invalid_request_error"}}')
        if isinstance(outcome, Dropped):
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        if isinstance(outcome, Stream):
            return httpx.Response(
                200, headers=outcome.headers, stream=_Events(self.handler.events(outcome)), request=request
            )
        headers = {**_JSON, **{k.lower(): v for k, v in (outcome.headers or {}).items()}}
        return httpx.Response(outcome.status, headers=headers, content=outcome.body, request=request)

    async def aclose(self) -> None:
        self.handler.hangs.cancel_all()
