"""The tracking endpoint (``TIDINGS_TRACKING_PORT``, 8080): click redirects, the email open
pixel and one-click unsubscribe, on a small asyncio HTTP/1.1 server.

* ``GET /c/<token>``: records CLICKED (with the URL) and answers ``302`` to the signed URL.
* ``GET /o/<token>``: records OPENED and answers a 1x1 transparent GIF (no caching).
* ``GET /u/<token>``: a page with an "Unsubscribe" button; ``POST /u/<token>`` (what mail
  clients send for RFC 8058 ``List-Unsubscribe=One-Click``) opts the subscription out in
  identity and records UNSUBSCRIBED.

Providers' delivery reports arrive under ``/p/`` (:mod:`services.delivery.reports_http`).
Tokens are signed (:mod:`services.delivery.tracking`); anything else is ``404``. The redirect
happens even if recording fails (the reader must reach the link); the failure is logged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from html import escape
from urllib.parse import quote, urlsplit, urlunsplit

from tidings.delivery.v1 import message_pb2

from services.delivery.identity_client import IdentityClient
from services.delivery.messages import engage
from services.delivery.reports_http import ProviderReports
from services.delivery.tracking import Purpose, Tracked, TrackingLinks
from services.runtime.app import ServiceContext
from services.runtime.errors import DomainError

__all__ = ["TrackingServer", "header_url"]

log = logging.getLogger(__name__)

_PURPOSES: dict[str, Purpose] = {"c": "c", "o": "o", "u": "u"}
#: What percent-encoding leaves as it is in a URL: its delimiters and existing escapes.
_URL_SAFE = "/:@!$&'()*+,;=%?~#[]"


def header_url(url: str) -> str:
    """``url`` as an HTTP header value: no CR/LF, and only ASCII (an IDNA host, the rest
    percent-encoded as UTF-8), so a link to ``https://tienda.example/ofertas/10€`` redirects."""
    url = url.replace("\r", "").replace("\n", "")
    if url.isascii():
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if not netloc.isascii():
        userinfo, at, hostport = netloc.rpartition("@")
        host, colon, port = hostport.partition(":")
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            host = quote(host, safe="")
        netloc = f"{quote(userinfo, safe=':%')}{at}{host}{colon}{port}"
    return urlunsplit(
        (
            parts.scheme,
            netloc,
            quote(parts.path, safe=_URL_SAFE),
            quote(parts.query, safe=_URL_SAFE),
            quote(parts.fragment, safe=_URL_SAFE),
        )
    )


_PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
_MAX_HEAD = 16 * 1024
_MAX_BODY = 4 * 1024
#: Bounce emails quote the original message.
_MAX_REPORT_BODY = 1024 * 1024
_IDLE_SECONDS = 30.0


class TrackingServer:
    """Serves the tracking endpoint.

    Args:
        ctx: The service context (pool, clock).
        links: Reads tokens.
        identity: Opts subscriptions out.
        reports: Handles providers' delivery reports (``/p/...``).
    """

    def __init__(
        self,
        ctx: ServiceContext,
        links: TrackingLinks,
        identity: IdentityClient,
        reports: ProviderReports,
    ) -> None:
        self._ctx = ctx
        self._links = links
        self._identity = identity
        self._reports = reports
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (once serving)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def run(self, host: str, port: int) -> None:
        """Serve until cancelled."""
        self._server = await asyncio.start_server(self._connection, host, port)
        self._ctx.log.info("tracking endpoint on %s:%d", host, self.port)
        async with self._server:
            await self._server.serve_forever()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _IDLE_SECONDS)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                    return
                if len(head) > _MAX_HEAD:
                    return
                request_line, *lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines:
                    name, _, value = line.partition(":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                parts = request_line.split(" ")
                if len(parts) != 3:
                    await self._write(writer, 400, "text/plain", b"bad request", close=True)
                    return
                method, target, _ = parts
                try:
                    length = int(headers.get("content-length", "0") or 0)
                except ValueError:
                    length = -1
                limit = _MAX_REPORT_BODY if target.startswith("/p/") else _MAX_BODY
                if (
                    length < 0
                    or length > limit
                    or "chunked" in headers.get("transfer-encoding", "")
                ):
                    await self._write(writer, 413, "text/plain", b"too large", close=True)
                    return
                data = await reader.readexactly(length) if length else b""
                if target.startswith("/p/"):
                    status, content_type, body = await self._reports.handle(
                        method, target, headers, data
                    )
                    extra = None
                else:
                    status, content_type, body, extra = await self._route(method, target)
                close = headers.get("connection", "").lower() == "close"
                await self._write(writer, status, content_type, body, extra=extra, close=close)
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _write(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        content_type: str,
        body: bytes,
        *,
        extra: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        reasons = {
            200: "OK",
            302: "Found",
            400: "Bad Request",
            403: "Forbidden",
            404: "Not Found",
            405: "Method Not Allowed",
            413: "Payload Too Large",
            503: "Service Unavailable",
        }
        lines = [
            f"HTTP/1.1 {status} {reasons.get(status, 'OK')}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            "Referrer-Policy: no-referrer",
        ]
        lines.extend(f"{name}: {value}" for name, value in (extra or {}).items())
        if close:
            lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    async def _route(
        self, method: str, target: str
    ) -> tuple[int, str, bytes, dict[str, str] | None]:
        path = target.split("?", 1)[0]
        kind, _, token = path.lstrip("/").partition("/")
        purpose = _PURPOSES.get(kind)
        tracked = self._links.read(token, purpose) if token and purpose else None
        if tracked is None or (kind == "c" and not tracked.url):
            return 404, "text/plain", b"not found", None
        now = self._ctx.clock()
        if kind == "c":
            if method not in ("GET", "HEAD"):
                return 405, "text/plain", b"method not allowed", None
            await self._record(tracked, message_pb2.MESSAGE_STATUS_CLICKED, now, url=tracked.url)
            return 302, "text/plain", b"", {"Location": header_url(tracked.url)}
        if kind == "o":
            await self._record(tracked, message_pb2.MESSAGE_STATUS_OPENED, now)
            return 200, "image/gif", _PIXEL, None
        if method == "POST":
            return await self._unsubscribe(tracked, now)
        page = (
            "<!doctype html><meta charset=utf-8><title>Unsubscribe</title>"
            f'<form method=post action="/u/{escape(token)}">'
            "<p>Stop receiving these emails?</p><button>Unsubscribe</button></form>"
        )
        return 200, "text/html; charset=utf-8", page.encode(), None

    async def _unsubscribe(
        self, tracked: Tracked, now: datetime
    ) -> tuple[int, str, bytes, dict[str, str] | None]:
        row = await self._ctx.pool.fetchrow(
            "SELECT subscription_id FROM messages WHERE app_id = $1 AND message_id = $2",
            tracked.app_id,
            tracked.message_id,
        )
        if row is None or not row["subscription_id"]:
            return 404, "text/plain", b"not found", None
        try:
            await self._identity.opt_out(tracked.app_id, row["subscription_id"], "list_unsubscribe")
        except DomainError:
            log.exception("opting out subscription %s failed", row["subscription_id"])
            return 503, "text/plain", b"try again later", None
        await self._record(tracked, message_pb2.MESSAGE_STATUS_UNSUBSCRIBED, now)
        return 200, "text/html; charset=utf-8", b"<p>You are unsubscribed.</p>", None

    async def _record(self, tracked: Tracked, status: int, now: datetime, url: str = "") -> None:
        call: Callable[[], Awaitable[int]] = lambda: engage(  # noqa: E731
            self._ctx.pool, tracked.app_id, tracked.message_id, status, now, url=url
        )
        try:
            await call()
        except DomainError:
            pass  # not (yet) a sent message of that app: nothing to record
        except Exception:
            log.exception("recording %s of %s failed", status, tracked.message_id)
