"""A small HTTP/1.1 client for webhooks: keep-alive pooling, an SSRF guard, bounded reads.

Delivery's webhook channel and journey's webhook nodes both call through it, one client per
process. Why not a general client: a webhook URL comes from the app (a template, maybe
personalised), so every call must resolve the host *itself*, refuse private, loopback,
link-local and metadata addresses unless the caller's policy allows them, and connect to the
very address it checked
(a second resolution could be answered differently: DNS rebinding). Connections are kept alive
per (scheme, address, port, host), so a broadcast to one endpoint reuses a few sockets instead
of opening one per message. Answers are read up to 64 KiB (a misbehaving endpoint cannot fill
memory); redirects are not followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from services.runtime.webhooks import AddressPolicy, IPAddress, address_refusal

__all__ = [
    "AddressPolicy",
    "AddressRefused",
    "AnswerLost",
    "HttpClient",
    "HttpResponse",
    "address_refusal",
]

_MAX_HEAD = 32 * 1024
_FRAMING_HEADERS = frozenset({"host", "content-length", "transfer-encoding"})
_MAX_BODY = 64 * 1024
_MAX_IDLE_PER_KEY = 512
_MAX_CACHED = 1024
#: A timeout whose timer fires this many seconds late finds the process was paused...
_LATE = 0.5
#: ...and gives answers already waiting in the socket this long to be read.
_GRACE = 0.5


class AddressRefused(Exception):
    """The URL's host is, or resolves to, an address the policy refuses."""


class AnswerLost(OSError):
    """The request went out but no answer came back (a timeout, a dropped connection): the
    receiver may have acted on it."""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """An answer: status, headers (lower-case names) and the start of the body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


_PoolKey = tuple[str, str, int, str]


class HttpClient:
    """Pooled HTTP/1.1 requests with the address policy applied on every call."""

    def __init__(self) -> None:
        self._idle: defaultdict[_PoolKey, list[_Connection]] = defaultdict(list)
        self._tls = ssl.create_default_context()
        # A broadcast calls one URL many times: its parse, and the verdict on a literal IP
        # (which no resolver can change), are kept rather than redone per message.
        self._urls: dict[str, SplitResult] = {}
        self._literals: dict[tuple[str, AddressPolicy], IPAddress | None] = {}

    def _split(self, url: str) -> SplitResult:
        parts = self._urls.get(url)
        if parts is None:
            if len(self._urls) >= _MAX_CACHED:
                self._urls.clear()
            parts = self._urls[url] = urlsplit(url)
        return parts

    def _literal(self, host: str, policy: AddressPolicy) -> IPAddress | None:
        """The address of a literal IP host that ``policy`` allows (None: not a literal).

        Raises:
            AddressRefused: A literal the policy refuses.
        """
        key = (host, policy)
        if key in self._literals:
            cached = self._literals[key]
        else:
            try:
                cached = ipaddress.ip_address(host.strip("[]"))
            except ValueError:
                cached = None
            if cached is not None:
                refusal = address_refusal(cached, policy)
                if refusal is not None:
                    raise AddressRefused(refusal)
            if len(self._literals) >= _MAX_CACHED:
                self._literals.clear()
            self._literals[key] = cached
        return cached

    async def _resolve(self, host: str, port: int, policy: AddressPolicy) -> IPAddress:
        literal = self._literal(host, policy)
        if literal is not None:
            return literal
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        candidates = [ipaddress.ip_address(info[4][0]) for info in infos]
        if not candidates:
            raise OSError(f"{host} has no address")
        # Every answer must pass: a mixed answer is how rebinding attacks slip through.
        for candidate in candidates:
            refusal = address_refusal(candidate, policy)
            if refusal is not None:
                raise AddressRefused(refusal)
        return candidates[0]

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        policy: AddressPolicy,
        timeout: float,  # noqa: ASYNC109
    ) -> HttpResponse:
        """Make one request.

        Raises:
            AddressRefused: The host's address is refused by ``policy``.
            ValueError: The URL is not http(s) with a host.
            AnswerLost: The request went out, its answer did not come (timeout, drop).
            OSError | TimeoutError: Network failures before the request went out.
        """
        parts = self._split(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http(s) URL with a host")
        secure = parts.scheme == "https"
        port = parts.port or (443 if secure else 80)
        host = parts.hostname
        sent = False
        try:
            async with asyncio.timeout(None) as deadline:
                expiry = _expire_at(deadline, asyncio.get_running_loop().time() + timeout)
                try:
                    address = await self._resolve(host, port, policy)
                    key: _PoolKey = (parts.scheme, str(address), port, host)
                    connection = self._take(key)
                    if connection is None:
                        reader, writer = await asyncio.open_connection(
                            str(address),
                            port,
                            ssl=self._tls if secure else None,
                            server_hostname=host if secure else None,
                        )
                        connection = _Connection(reader, writer)
                    try:
                        _write_request(connection, method, parts, host, port, headers, body)
                        sent = True
                        await connection.writer.drain()
                        response, keep = await _read_response(connection.reader, method)
                    except BaseException:
                        connection.close()
                        raise
                finally:
                    expiry.cancel()
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as error:
            if sent:
                raise AnswerLost(f"{type(error).__name__}: {error}") from error
            raise
        if keep:
            self._give_back(key, connection)
        else:
            connection.close()
        return response

    def close(self) -> None:
        """Close every idle connection."""
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()

    def _take(self, key: _PoolKey) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.usable():
                return connection
            connection.close()
        return None

    def _give_back(self, key: _PoolKey, connection: _Connection) -> None:
        idle = self._idle[key]
        if len(idle) < _MAX_IDLE_PER_KEY:
            idle.append(connection)
        else:
            connection.close()


def _expire_at(deadline: asyncio.Timeout, when: float) -> asyncio.TimerHandle:
    """Time ``deadline`` out at loop time ``when``, unless the expiry itself runs late.

    A process that was paused (SIGSTOP, a VM or GC pause) wakes with its answers waiting in
    the socket and its timers overdue: the timer must not win over an answer that arrived in
    time. A late expiry therefore grants one short grace for the waiting reads to run.
    """
    loop = asyncio.get_running_loop()

    def expire() -> None:
        if loop.time() - when > _LATE:
            deadline.reschedule(loop.time() + _GRACE)
        else:
            deadline.reschedule(loop.time())

    return loop.call_at(when, expire)


def _write_request(
    connection: _Connection,
    method: str,
    parts: SplitResult,
    host: str,
    port: int,
    headers: Mapping[str, str],
    body: bytes,
) -> None:
    path = parts.path or "/"
    target = f"{path}?{parts.query}" if parts.query else path
    default_port = 443 if parts.scheme == "https" else 80
    host_header = host if port == default_port else f"{host}:{port}"
    if ":" in host and not host.startswith("["):
        host_header = f"[{host}]" if port == default_port else f"[{host}]:{port}"
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host_header}"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} contains a line break")
        # The client frames the request itself: a second Host or length from an app's template
        # would let the receiver (or a proxy before it) read a different request than we sent.
        if name.strip().lower() in _FRAMING_HEADERS:
            continue
        lines.append(f"{name}: {value}")
    lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    connection.writer.write(head + body)


async def _read_response(reader: asyncio.StreamReader, method: str) -> tuple[HttpResponse, bool]:
    try:
        raw_head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise OSError("response head too large") from None
    if len(raw_head) > _MAX_HEAD:
        raise OSError("response head too large")
    status_line, *header_lines = raw_head.decode("latin-1").split("\r\n")
    fields = status_line.split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not fields[1].isdigit():
        raise OSError(f"malformed status line {status_line[:80]!r}")
    status = int(fields[1])
    headers: dict[str, str] = {}
    for line in header_lines:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    keep = fields[0] == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return HttpResponse(status, headers, b""), keep
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body, complete = await _read_chunked(reader)
        return HttpResponse(status, headers, body), keep and complete
    length_text = headers.get("content-length")
    if length_text is not None and length_text.isdigit():
        length = int(length_text)
        body = await reader.readexactly(min(length, _MAX_BODY))
        # Longer than we read: the rest is never read, so the connection cannot be reused.
        return HttpResponse(status, headers, body), keep and length <= _MAX_BODY
    body = await reader.read(_MAX_BODY)  # until close
    return HttpResponse(status, headers, body), False


async def _read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # trailers are not supported beyond the empty line
            return bytes(body), True
        if len(body) + size > _MAX_BODY:
            return bytes(body), False
        body += await reader.readexactly(size)
        await reader.readexactly(2)
