"""A local HTTP endpoint that records what delivery sends it: the webhook "sink" of the tests
and the benchmark, which also answers as a Telegram Bot API would (``{"ok": true, ...}``).

It counts requests per ``Idempotency-Key`` (duplicates) and per message id, can verify the
webhook signature, answer from a script (503 then 200, a 429 with Retry-After...) and delay its
answers (to catch a worker mid-call). A tiny HTTP/1.1 server with keep-alive, so it is not the
bottleneck of a benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Sink", "SinkRequest"]


@dataclass
class SinkRequest:
    """One request the sink received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    time: float

    def json(self) -> object:
        return json.loads(self.body)


Reply = tuple[int, dict[str, str], bytes]
_OK_BODY = json.dumps({"ok": True, "result": {"message_id": 1}}).encode()


@dataclass
class Sink:
    """Records requests; answers 200 unless :attr:`script` says otherwise.

    Attributes:
        script: Called with each request; returns (status, headers, body) or None for 200.
        delay: Seconds to wait before answering each request.
        keep: Whether to keep every request (tests) or only count (benchmarks).
    """

    script: Callable[[SinkRequest], Reply | None] | None = None
    delay: float = 0.0
    keep: bool = True
    #: A request header carrying the send's request time (ms since the epoch): each request's
    #: latency (arrival - that) is appended to :attr:`latencies_ms`.
    latency_header: str | None = None
    latencies_ms: list[float] = field(default_factory=list)
    received: list[SinkRequest] = field(default_factory=list)
    keys: Counter[str] = field(default_factory=Counter)
    count: int = 0
    connections: int = 0
    _server: asyncio.Server | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def duplicates(self) -> int:
        """Requests beyond the first for any idempotency key."""
        return sum(n - 1 for n in self.keys.values() if n > 1)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> Sink:
        self._server = await asyncio.start_server(self._serve, host, port, backlog=1024)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def __aenter__(self) -> Sink:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_for(self, count: int, within: float = 30.0) -> list[SinkRequest]:
        """Wait until at least ``count`` requests arrived."""
        deadline = time.monotonic() + within
        while self.count < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"sink got {self.count} requests, expected {count}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(remaining, 0.5))
        return self.received

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                request_line, *lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines:
                    name, _, value = line.partition(":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                method, path, _ = request_line.split(" ", 2)
                request = SinkRequest(method, path, headers, body, time.time())
                self.count += 1
                key = headers.get("idempotency-key")
                if key:
                    self.keys[key] += 1
                if self.latency_header is not None:
                    stamp = headers.get(self.latency_header)
                    if stamp:
                        self.latencies_ms.append(request.time * 1000 - float(stamp))
                if self.keep:
                    self.received.append(request)
                self._arrived.set()
                if self.delay:
                    await asyncio.sleep(self.delay)
                reply = self.script(request) if self.script is not None else None
                status, extra, payload = reply or (200, {}, _OK_BODY)
                out = [f"HTTP/1.1 {status} X", f"Content-Length: {len(payload)}"]
                out.extend(f"{k}: {v}" for k, v in extra.items())
                writer.write(("\r\n".join(out) + "\r\n\r\n").encode() + payload)
                await writer.drain()
        except (ConnectionError, ValueError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()
