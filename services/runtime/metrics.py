"""Prometheus metrics of one process and the tiny asyncio HTTP server that exposes them.

Each process builds one :class:`Metrics`; its ``registry`` is where service code adds its own
metrics (``Counter("journey_steps_total", "...", registry=ctx.metrics.registry)``). A registry
per instance, not prometheus_client's global one, so tests can run several servers in one
process without "duplicated timeseries" errors.

The gRPC metric names follow go-grpc-prometheus (``grpc_server_handled_total``,
``grpc_server_handling_seconds``) so existing dashboards work unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

__all__ = ["MethodMetrics", "Metrics", "MetricsServer", "split_method"]

_log = logging.getLogger(__name__)

#: Latency buckets from 1 ms (a cached read) up to 30 s (a large import chunk).
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

#: A scrape request is a few hundred bytes; anything slower than this is not Prometheus.
_REQUEST_TIMEOUT_SECONDS = 5.0


def split_method(method: str) -> tuple[str, str]:
    """Split ``/pkg.Service/Method`` into ``("pkg.Service", "Method")``."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service or "unknown", name or "unknown"


class Metrics:
    """The metrics of one process: gRPC server metrics plus whatever services register.

    Args:
        registry: Registry to use; a fresh one (with process, platform and GC collectors)
            by default.

    Attributes:
        registry: Where every metric of this process lives; add yours here.
        rpc_started: RPCs received, by service and method.
        rpc_handled: RPCs completed, by service, method and status code.
        rpc_latency: Handling time in seconds, by service and method.
        rpc_in_flight: RPCs currently being handled, by service.
        dependency_up: 1 while a dependency (``postgres``, ``kafka``) answers, else 0.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        self.rpc_started = Counter(
            "grpc_server_started_total",
            "RPCs started on the server.",
            ["grpc_service", "grpc_method"],
            registry=registry,
        )
        self.rpc_handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code.",
            ["grpc_service", "grpc_method", "grpc_code"],
            registry=registry,
        )
        self.rpc_latency = Histogram(
            "grpc_server_handling_seconds",
            "Time from receiving an RPC to sending its status.",
            ["grpc_service", "grpc_method"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.rpc_in_flight = Gauge(
            "grpc_server_in_flight",
            "RPCs being handled right now.",
            ["grpc_service"],
            registry=registry,
        )
        self.dependency_up = Gauge(
            "tidings_dependency_up",
            "Whether a dependency answered the last health probe (1) or not (0).",
            ["dependency"],
            registry=registry,
        )

    def rpc_done(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Record one completed RPC.

        Args:
            method: Full method name, ``/pkg.Service/Method``.
            code: Final status code.
            seconds: Handling time.
        """
        service, name = split_method(method)
        self.rpc_handled.labels(service, name, code.name).inc()
        self.rpc_latency.labels(service, name).observe(seconds)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)

    def for_method(self, method: str) -> MethodMetrics:
        """The RPC metrics of one method, with their labelled children resolved once."""
        return MethodMetrics(self, method)


class MethodMetrics:
    """The RPC metrics of one method, labels resolved up front (the interceptor's hot path).

    ``labels()`` takes a lock and builds a key on every call; an RPC touched five of them.
    The same series as :meth:`Metrics.rpc_done` and friends are recorded.

    Args:
        metrics: The process metrics.
        method: Full method name, ``/pkg.Service/Method``.
    """

    def __init__(self, metrics: Metrics, method: str) -> None:
        service, name = split_method(method)
        self._handled = metrics.rpc_handled
        self._service = service
        self._name = name
        self.started = metrics.rpc_started.labels(service, name)
        self.in_flight = metrics.rpc_in_flight.labels(service)
        self._latency = metrics.rpc_latency.labels(service, name)
        # Filled as codes occur: at most one child per status code.
        self._by_code: dict[grpc.StatusCode, Counter] = {}

    def done(self, code: grpc.StatusCode, seconds: float) -> None:
        """Record one completed RPC (not the in-flight gauge, which the caller keeps)."""
        handled = self._by_code.get(code)
        if handled is None:
            handled = self._by_code[code] = self._handled.labels(
                self._service, self._name, code.name
            )
        handled.inc()
        self._latency.observe(seconds)


class MetricsServer:
    """Serves ``GET /metrics`` over plain HTTP/1.1 with asyncio streams (no threads).

    It answers one request per connection and closes it, which is all a Prometheus scrape
    needs, and keeps the runtime free of an HTTP framework dependency.

    Args:
        metrics: The metrics to expose.
        host: Interface to listen on.
        port: TCP port; 0 picks a free one (see :attr:`port`).
    """

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None] | None, asyncio.StreamWriter] = {}

    @property
    def port(self) -> int:
        """The bound port (useful when constructed with port 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind and start accepting scrapes.

        Raises:
            OSError: If the address cannot be bound.
        """
        self._server = await asyncio.start_server(self._accept, self._host, self._port)

    async def stop(self) -> None:
        """Stop listening and drop any scrape still being answered."""
        if self._server is None:
            return
        self._server.close()
        # Abort the sockets rather than cancel the handler tasks: their reads then end at EOF
        # and the tasks finish normally (asyncio reports a cancelled client task as an error).
        for writer in self._connections.values():
            writer.transport.abort()
        await asyncio.gather(
            *(task for task in self._connections if task is not None), return_exceptions=True
        )
        await self._server.wait_closed()
        self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections[task] = writer
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT_SECONDS):
                await self._answer(reader, writer)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            # A scraper that hangs up or sends garbage is its own problem, not an error of ours.
            _log.debug("metrics request dropped: %s", type(exc).__name__)
        finally:
            self._connections.pop(task, None)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = (await reader.readline()).decode("latin-1").split()
        # Headers carry nothing we need, but they must be read before answering.
        while request_line and (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass
        if len(request_line) < 2:
            status, body, content_type = "400 Bad Request", b"bad request\n", "text/plain"
        elif request_line[0] not in ("GET", "HEAD"):
            status, body, content_type = "405 Method Not Allowed", b"GET only\n", "text/plain"
        elif request_line[1].split("?", 1)[0] == "/metrics":
            status, body, content_type = "200 OK", self._metrics.exposition(), CONTENT_TYPE_LATEST
        else:
            status, body, content_type = "404 Not Found", b"see /metrics\n", "text/plain"
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("latin-1")
        writer.write(head if request_line[:1] == ["HEAD"] else head + body)
        await writer.drain()
