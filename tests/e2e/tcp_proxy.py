"""A TCP proxy that can cut a service off from a dependency and reconnect it (fault injection).

Like asyncpg's test base, tests route a connection (service → Postgres, service → Kafka) through
a local proxy instead of stopping the shared server::

    async with TcpProxy("127.0.0.1", 55432) as proxy:
        dsn = proxy.rewrite_dsn(scratch_db)
        ...                      # start the service with dsn
        proxy.cut()              # every open connection dies, new ones are dropped at once
        ...
        proxy.restore()          # connections go through again
        proxy.latency = 0.2      # every chunk forwarded waits 200 ms first (each direction)
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

_CHUNK = 64 * 1024


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``host:port``, with a switch to drop everything.

    Args:
        host: Target host.
        port: Target port.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._cut = False
        #: Seconds each forwarded chunk waits before it is written (a slow network).
        self.latency = 0.0
        self._transports: set[asyncio.WriteTransport] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The local port clients connect to."""
        assert self._server is not None, "start the proxy first"
        return int(self._server.sockets[0].getsockname()[1])

    def rewrite_dsn(self, dsn: str) -> str:
        """``dsn`` with its host and port replaced by the proxy's."""
        parts = urlsplit(dsn)
        credentials, _, _ = parts.netloc.rpartition("@")
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def start(self) -> None:
        """Listen on a free local port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    def cut(self) -> None:
        """Kill every proxied connection and drop new ones until :meth:`restore`."""
        self._cut = True
        for transport in list(self._transports):
            # abort, not close: the peer sees a reset, as when a server dies.
            transport.abort()

    def restore(self) -> None:
        """Let connections through again."""
        self._cut = False

    async def stop(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        self.cut()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _accept(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._transports.add(client_writer.transport)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            if self._cut:
                return
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
            except OSError:
                return
            self._transports.add(upstream_writer.transport)
            await asyncio.gather(
                self._pump(client_reader, upstream_writer),
                self._pump(upstream_reader, client_writer),
            )
        finally:
            self._tasks.discard(task)
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    self._transports.discard(writer.transport)
                    writer.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction until EOF or a broken connection; then end the other side."""
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(_CHUNK):
                if self.latency > 0:
                    await asyncio.sleep(self.latency)
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
