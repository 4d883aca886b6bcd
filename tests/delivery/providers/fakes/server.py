"""The frame every HTTP provider fake shares: a hypercorn server (HTTP/1.1, or HTTP/2 over TLS
with ALPN) on a free loopback port, that records each request and lets the fake answer it.

A fake subclasses :class:`FakeHttpServer` and implements :meth:`~FakeHttpServer.answer`; tests
read :attr:`~FakeHttpServer.received` to see exactly what the adapter sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import parse_qs

from hypercorn.asyncio import serve
from hypercorn.config import Config

from tests.delivery.providers.fakes.tls import TlsFiles

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass
class Request:
    """One request as the fake received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    http_version: str
    peer: tuple[str, int] | None = None

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        """The form-encoded body (the last value of a repeated field)."""
        return {k: v[-1] for k, v in parse_qs(self.body.decode(), keep_blank_values=True).items()}


@dataclass
class Reply:
    """The fake's answer."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, value: Any, headers: dict[str, str] | None = None) -> Reply:
        return cls(
            status,
            json.dumps(value).encode(),
            {"content-type": "application/json; charset=utf-8", **(headers or {})},
        )


class FakeHttpServer:
    """A local HTTP server; ``async with`` starts and stops it.

    Args:
        tls: Serve HTTPS with this certificate (ALPN offers h2 and http/1.1).
    """

    def __init__(self, *, tls: TlsFiles | None = None) -> None:
        self.tls = tls
        self.received: list[Request] = []
        self._port = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """The base URL, without a trailing slash."""
        scheme = "https" if self.tls else "http"
        host = "localhost" if self.tls else "127.0.0.1"
        return f"{scheme}://{host}:{self._port}"

    async def answer(self, request: Request) -> Reply:
        """The fake's protocol: what to answer to one request."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        config = Config()
        config.bind = [f"fd://{sock.detach()}"]  # hypercorn takes the descriptor over
        config.graceful_timeout = 0.5
        config.errorlog = None
        config.accesslog = None
        if self.tls is not None:
            config.certfile = str(self.tls.certfile)
            config.keyfile = str(self.tls.keyfile)
        self._task = asyncio.create_task(
            serve(self._app, config, shutdown_trigger=self._stop.wait, mode="asgi")  # type: ignore[arg-type]
        )
        await self._wait_listening()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _wait_listening(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            if self._task is not None and self._task.done():
                self._task.result()  # raises what made the server stop
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self._port)
                writer.close()
                await writer.wait_closed()
                return
            if loop.time() > deadline:
                raise TimeoutError(f"fake server on port {self._port} never listened")
            await asyncio.sleep(0.01)

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = Request(
            method=scope["method"],
            path=scope["path"],
            query=scope["query_string"].decode(),
            headers={k.decode().lower(): v.decode() for k, v in scope["headers"]},
            body=body,
            http_version=scope["http_version"],
            peer=tuple(scope["client"]) if scope.get("client") else None,
        )
        self.received.append(request)
        reply = await self.answer(request)
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": [(k.encode(), v.encode()) for k, v in reply.headers.items()],
            }
        )
        await send({"type": "http.response.body", "body": reply.body})
