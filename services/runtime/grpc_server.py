"""Building the grpc.aio server every service runs: interceptors, health checking, reflection.

Health uses the standard ``grpc.health.v1.Health`` service; :class:`Health` only adds the
all-or-nothing switch the process lifecycle needs (every served name flips together) and
remembers the current state so flipping is idempotent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

# The asyncio servicer; grpcio-health-checking exports it as health.aio, which its stubs omit.
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

__all__ = ["Health", "bind", "create_server", "enable_reflection"]

#: Server channel options.
_SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    # gRPC sets SO_REUSEPORT by default, letting a second process bind the same port and
    # silently steal half the connections; one port, one process.
    ("grpc.so_reuseport", 0),
    # Imports arrive as client-streamed chunks; keep one message well under this.
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # Answer client keepalive pings (grpcurl, SDKs behind NAT) instead of closing with
    # ENHANCE_YOUR_CALM.
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)


def create_server(interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]]) -> grpc.aio.Server:
    """A grpc.aio server with our interceptors and channel options, not yet bound or started.

    Args:
        interceptors: Server interceptors, outermost first.

    Returns:
        The server.
    """
    return grpc.aio.server(interceptors=list(interceptors), options=list(_SERVER_OPTIONS))


def bind(server: grpc.aio.Server, host: str, port: int) -> int:
    """Listen on ``host:port`` without TLS (TLS terminates in front of the service).

    Args:
        server: The server, not yet started.
        host: Interface; ``0.0.0.0`` for all IPv4 interfaces.
        port: TCP port; 0 picks a free one.

    Returns:
        The bound port.

    Raises:
        RuntimeError: If the address cannot be bound (grpc's error for a port in use).
    """
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if bound == 0:  # Older grpc versions report failure this way instead of raising.
        raise RuntimeError(f"could not bind gRPC server to {address}")
    return bound


class Health:
    """The standard health service, with every served name switched together.

    Create it with :meth:`register`, which starts every name NOT_SERVING (the overall server
    ``""`` included), so nothing routes traffic to the process until it says it is ready.

    Args:
        server: The server to register ``grpc.health.v1.Health`` on.
        services: Full names of the services this process serves.
    """

    def __init__(self, server: grpc.aio.Server, services: Sequence[str]) -> None:
        self._servicer = HealthServicer()
        self._names = ("", *services)
        self._serving: bool | None = None
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)

    @classmethod
    async def register(cls, server: grpc.aio.Server, services: Sequence[str]) -> Health:
        """Add the health service to ``server`` with every name NOT_SERVING.

        Args:
            server: The server, not yet started.
            services: Full names of the services this process serves.

        Returns:
            The switch for all those names.
        """
        self = cls(server, services)
        # The stock servicer starts with "" SERVING; nothing is ready before we say so.
        await self.set_serving(False)
        return self

    @property
    def serving(self) -> bool:
        """Whether the names currently report SERVING."""
        return bool(self._serving)

    async def set_serving(self, serving: bool) -> bool:
        """Report SERVING or NOT_SERVING for every name.

        Args:
            serving: The new state.

        Returns:
            True if the state changed.
        """
        if self._serving is serving:
            return False
        self._serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._names:
            await self._servicer.set(name, status)
        return True

    async def shut_down(self) -> None:
        """Report NOT_SERVING for good: later :meth:`set_serving` calls are ignored."""
        self._serving = False
        await self._servicer.enter_graceful_shutdown()


def enable_reflection(server: grpc.aio.Server, services: Sequence[str]) -> None:
    """Serve server reflection for ``services``, health and reflection itself.

    The descriptors come from the default pool, which the generated ``*_pb2`` modules fill when
    imported, so ``grpcurl list``/``describe`` work with no proto files at hand.
    """
    names = (
        *services,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
