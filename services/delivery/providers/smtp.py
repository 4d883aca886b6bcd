"""Email over SMTP submission (aiosmtplib), with one-click unsubscribe headers.

Credentials: ``host``; ``port`` (default 587, or 465 with ``security: tls``, 25 with
``none``); ``security``: ``starttls`` (default: STARTTLS is required), ``tls`` (implicit TLS)
or ``none`` (a relay on a trusted network); ``username``/``password`` (AUTH, both or neither);
``from_address`` (used when the content has none, ``Acme <news@acme.example>``); optional
``reply_to``, ``envelope_from`` (the bounce address for ``MAIL FROM``) and
``unsubscribe_mailto`` (an address added to List-Unsubscribe).

The message is ``multipart/alternative`` (text, then HTML; a text part is derived from the
HTML when the template has none) with From, To, Reply-To, Subject, Date, a ``Message-ID``
derived from the idempotency key (so a re-sent duplicate is recognisable downstream), and,
when the content has an unsubscribe URL, ``List-Unsubscribe`` (RFC 2369) plus
``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` (RFC 8058, https URLs only).

Answers: 250 to DATA is SENT. A permanent (5xx) refusal of the recipient is a hard bounce:
FAILED and the address marked dead, unless its enhanced status code says it is about policy
(5.7.x: spam, reputation) or a full mailbox (5.2.2), which say nothing about the address.
Other 5xx (sender, content, AUTH) fail; 4xx and connection problems are RETRY.

Connections are pooled per server and account (TLS and AUTH once, not per message); one that
sat idle long is closed rather than reused, and a reused one that turns out dead before the
transaction started is replaced transparently, since nothing was sent on it. At most
``max_connections`` transactions (default 10, ``TIDINGS_SMTP_MAX_CONNECTIONS``) run at once, so
no server ever sees more sessions from us than that (a session is opened only when none of
that server's is idle): relays answer a burst of sessions with 421. The worker's send window
follows the bound.
"""

from __future__ import annotations

import asyncio
import email.policy
import email.utils
import hashlib
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from html.parser import HTMLParser
from typing import Any

import aiosmtplib

from services.delivery.providers.base import (
    Channel,
    CredentialsError,
    EmailContent,
    OutboundMessage,
    Outcome,
    ProviderResult,
)
from services.delivery.providers.http import not_sent, require_text

__all__ = ["SECURITY_MODES", "SmtpAdapter", "html_to_text"]

SECURITY_MODES = ("starttls", "tls", "none")
_DEFAULT_PORTS = {"starttls": 587, "tls": 465, "none": 25}
#: Enhanced status codes (RFC 3463) of a permanent refusal that do not mean the address is bad.
_NOT_THE_ADDRESS = re.compile(r"^5\.(7\.\d+|2\.2|3\.\d+|4\.\d+|6\.\d+)\b")
_ENHANCED = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})\b")
_ADDRESS = re.compile(r"[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+")
#: SMTP sessions open at once by default: what relays commonly allow one client.
DEFAULT_MAX_CONNECTIONS = 10


@dataclass(frozen=True, slots=True)
class _Server:
    host: str
    port: int
    security: str
    username: str
    password: str


@dataclass(frozen=True, slots=True)
class _Config:
    server: _Server
    from_address: str
    reply_to: str
    envelope_from: str
    unsubscribe_mailto: str


class _Refused(Exception):
    """A step of the transaction was refused; carries the classified result."""

    def __init__(self, result: ProviderResult) -> None:
        super().__init__(result.detail)
        self.result = result


class _AnswerLost(Exception):
    """The message data went out and the server's answer did not come back."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class SmtpAdapter:
    """Sends email through the app's SMTP server.

    Args:
        timeout: Seconds for connecting and for each command.
        tls_context: The TLS context for STARTTLS and implicit TLS (a test CA); the system's
            trust store otherwise.
        local_hostname: The name given in EHLO (the machine's FQDN otherwise).
        idle_seconds: A pooled connection idle longer than this is closed, not reused.
        max_idle: Connections kept per server and account (default: ``max_connections``).
        max_connections: SMTP transactions at once, over all servers; no server gets more
            sessions than this.
        clock: A monotonic clock (tests move it).
    """

    name = "smtp"
    channel = Channel.EMAIL

    def __init__(
        self,
        *,
        timeout: float = 30.0,
        tls_context: ssl.SSLContext | None = None,
        local_hostname: str | None = None,
        idle_seconds: float = 30.0,
        max_idle: int | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._timeout = timeout
        self._tls_context = tls_context
        self._local_hostname = local_hostname
        self._idle_seconds = idle_seconds
        self._max_connections = max_connections
        self._max_idle = max_connections if max_idle is None else max_idle
        # One slot per transaction in progress; an idle pooled session holds none.
        self._slots = asyncio.Semaphore(max_connections)
        self._clock = clock
        self._idle: dict[_Server, list[tuple[aiosmtplib.SMTP, float]]] = {}

    @property
    def max_in_flight(self) -> int:
        """Messages that can be in an SMTP transaction at once."""
        return self._max_connections

    def check_credentials(self, credentials: Mapping[str, Any]) -> None:
        _config(credentials)

    async def send(
        self, message: OutboundMessage, credentials: Mapping[str, Any]
    ) -> ProviderResult:
        try:
            config = _config(credentials)
        except CredentialsError as error:
            return not_sent(self.name, f"credentials: {error}")
        content = message.content
        if not isinstance(content, EmailContent):
            return not_sent(self.name, "an email needs email content")
        recipient = message.recipient.address.strip()
        if not _ADDRESS.fullmatch(recipient):
            return ProviderResult(
                Outcome.FAILED, detail=f"{self.name}:not an email address", token_invalid=True
            )
        from_header = content.from_address or config.from_address
        if not from_header:
            return not_sent(self.name, "no from address (content or credentials from_address)")
        sender = config.envelope_from or email.utils.parseaddr(from_header)[1]
        try:
            mime = _mime(message, content, from_header, config)
        except (ValueError, TypeError) as error:  # a header the email package refuses
            return not_sent(self.name, f"message not buildable: {error}")
        utf8 = not (sender + recipient).isascii()
        policy = email.policy.SMTPUTF8 if utf8 else email.policy.SMTP
        try:
            payload = mime.as_bytes(policy=policy)
            async with self._slots:
                await self._transaction(config.server, sender, recipient, payload, utf8=utf8)
        except _Refused as refused:
            return refused.result
        except _AnswerLost as lost:
            # The message went out; whether the server queued it is unknown.
            return ProviderResult(
                Outcome.RETRY,
                detail=f"{self.name}:no answer to the message: {lost.error}",
                maybe_delivered=True,
            )
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            kind = "timeout" if isinstance(error, TimeoutError) else "unreachable"
            return ProviderResult(Outcome.RETRY, detail=f"{self.name}:{kind}: {error}")
        except ValueError as error:  # an address SMTP cannot carry (control characters)
            return not_sent(self.name, f"address not sendable: {error}")
        return ProviderResult(Outcome.SENT, provider_message_id=mime["Message-ID"].strip("<>"))

    async def _transaction(
        self, server: _Server, sender: str, recipient: str, payload: bytes, *, utf8: bool
    ) -> None:
        client, reused = await self._acquire(server)
        try:
            try:
                await self._mail(client, sender, payload, utf8=utf8)
            except aiosmtplib.SMTPServerDisconnected:
                if not reused:
                    raise
                # The server closed the idle connection: nothing was sent on it, start afresh.
                client.close()
                client = await self._connect(server)
                await self._mail(client, sender, payload, utf8=utf8)
            await client.rcpt(recipient, encoding="utf-8" if utf8 else "ascii")
            try:
                await client.data(payload)
            except (
                aiosmtplib.SMTPServerDisconnected,
                aiosmtplib.SMTPTimeoutError,
                OSError,
                TimeoutError,
            ) as error:
                raise _AnswerLost(error) from error
        except aiosmtplib.SMTPResponseException as error:
            await _reset_or_close(client)
            self._release(server, client)
            raise _Refused(self._refusal(error)) from None
        except BaseException:
            client.close()
            raise
        self._release(server, client)

    async def _mail(
        self, client: aiosmtplib.SMTP, sender: str, payload: bytes, *, utf8: bool
    ) -> None:
        options = [f"SIZE={len(payload)}"] if client.supports_extension("size") else []
        if utf8:
            if not client.supports_extension("smtputf8"):
                raise _Refused(not_sent(self.name, "the server cannot take non-ASCII addresses"))
            options.append("SMTPUTF8")
        await client.mail(sender, options=options, encoding="utf-8" if utf8 else "ascii")

    def _refusal(self, error: aiosmtplib.SMTPResponseException) -> ProviderResult:
        step = {
            aiosmtplib.SMTPSenderRefused: "sender refused",
            aiosmtplib.SMTPRecipientRefused: "recipient refused",
            aiosmtplib.SMTPDataError: "message refused",
        }.get(type(error), "refused")
        detail = f"{self.name}:{step}: {error.code} {error.message}"
        if error.code < 500:
            return ProviderResult(Outcome.RETRY, detail=detail)
        bounce = isinstance(error, aiosmtplib.SMTPRecipientRefused) and _hard_bounce(error.message)
        return ProviderResult(Outcome.FAILED, detail=detail, token_invalid=bounce)

    async def _acquire(self, server: _Server) -> tuple[aiosmtplib.SMTP, bool]:
        idle = self._idle.get(server, [])
        now = self._clock()
        while idle:
            client, since = idle.pop()
            if client.is_connected and now - since < self._idle_seconds:
                return client, True
            client.close()
        return await self._connect(server), False

    async def _connect(self, server: _Server) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(
            hostname=server.host,
            port=server.port,
            username=server.username or None,
            password=server.password or None,
            use_tls=server.security == "tls",
            start_tls=server.security == "starttls",
            tls_context=self._tls_context,
            local_hostname=self._local_hostname,
            timeout=self._timeout,
        )
        try:
            await client.connect()
        except (ConnectionError, TimeoutError, OSError):
            client.close()
            raise
        except aiosmtplib.SMTPResponseException as error:  # greeting, EHLO, STARTTLS or AUTH
            client.close()
            step = "auth" if isinstance(error, aiosmtplib.SMTPAuthenticationError) else "connect"
            outcome = Outcome.RETRY if error.code < 500 else Outcome.FAILED
            raise _Refused(
                ProviderResult(outcome, detail=f"{self.name}:{step}: {error.code} {error.message}")
            ) from None
        except aiosmtplib.SMTPException as error:  # no STARTTLS or AUTH offered: a setup problem
            client.close()
            raise _Refused(ProviderResult(Outcome.FAILED, detail=f"{self.name}:{error}")) from None
        except BaseException:
            client.close()
            raise
        return client

    def _release(self, server: _Server, client: aiosmtplib.SMTP) -> None:
        idle = self._idle.setdefault(server, [])
        if client.is_connected and len(idle) < self._max_idle:
            idle.append((client, self._clock()))
        else:
            client.close()

    async def close(self) -> None:
        pools, self._idle = self._idle, {}
        for idle in pools.values():
            for client, _ in idle:
                try:
                    await client.quit()
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    client.close()


async def _reset_or_close(client: aiosmtplib.SMTP) -> None:
    try:
        await client.rset()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        client.close()


def _hard_bounce(reply: str) -> bool:
    """A permanent refusal of the recipient that says the address itself is bad."""
    enhanced = _ENHANCED.match(reply)
    return enhanced is None or not _NOT_THE_ADDRESS.match(enhanced.group(1))


def _mime(
    message: OutboundMessage, content: EmailContent, from_header: str, config: _Config
) -> EmailMessage:
    mime = EmailMessage()
    mime["From"] = from_header
    mime["To"] = message.recipient.address.strip()
    reply_to = content.reply_to or config.reply_to
    if reply_to:
        mime["Reply-To"] = reply_to
    mime["Subject"] = content.subject
    mime["Date"] = email.utils.formatdate(usegmt=True)
    domain = email.utils.parseaddr(from_header)[1].rpartition("@")[2] or "tidings.invalid"
    digest = hashlib.sha256(message.idempotency_key.encode()).hexdigest()[:32]
    mime["Message-ID"] = f"<{digest}@{domain}>"
    targets = []
    if content.unsubscribe_url:
        targets.append(f"<{content.unsubscribe_url}>")
    if config.unsubscribe_mailto:
        targets.append(f"<mailto:{config.unsubscribe_mailto}?subject=unsubscribe>")
    if targets:
        mime["List-Unsubscribe"] = ", ".join(targets)
    if content.unsubscribe_url.startswith("https://"):
        mime["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    text = content.text or (html_to_text(content.html) if content.html else "")
    mime.set_content(text or " ", cte="quoted-printable")
    if content.html:
        mime.add_alternative(content.html, subtype="html", cte="quoted-printable")
    return mime


class _TextExtractor(HTMLParser):
    _BREAKS = frozenset({"br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6"})
    _HIDDEN = frozenset({"style", "script", "head", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0
        self._href: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self._hidden += 1
        elif tag in self._BREAKS:
            self.parts.append("\n")
        if tag == "a":
            self._href.append(dict(attrs).get("href") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in ("p", "div", "h1", "h2", "h3", "h4", "h5", "h6"):
            self.parts.append("\n")
        if tag == "a" and self._href:
            href = self._href.pop()
            if href.startswith(("http://", "https://")):
                self.parts.append(f" ({href})")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """A readable text alternative of an HTML body (links kept as ``text (url)``)."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _config(credentials: Mapping[str, Any]) -> _Config:
    host = require_text(credentials, "host")
    security = credentials.get("security") or "starttls"
    if security not in SECURITY_MODES:
        raise CredentialsError(f"security: one of {', '.join(SECURITY_MODES)}")
    port = credentials.get("port") or _DEFAULT_PORTS[security]
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise CredentialsError("port: a TCP port number")
    username = credentials.get("username") or ""
    password = credentials.get("password") or ""
    if not isinstance(username, str) or not isinstance(password, str):
        raise CredentialsError("username: username and password are strings")
    if bool(username) != bool(password):
        raise CredentialsError(f"{'password' if username else 'username'}: required with the other")
    addresses = {}
    for field in ("from_address", "reply_to", "envelope_from", "unsubscribe_mailto"):
        value = credentials.get(field) or ""
        if not isinstance(value, str):
            raise CredentialsError(f"{field}: an email address")
        if value and not _ADDRESS.fullmatch(email.utils.parseaddr(value)[1]):
            raise CredentialsError(f"{field}: not an email address")
        addresses[field] = value.strip()
    return _Config(
        server=_Server(host, port, security, username, password),
        from_address=addresses["from_address"],
        reply_to=addresses["reply_to"],
        envelope_from=addresses["envelope_from"],
        unsubscribe_mailto=addresses["unsubscribe_mailto"],
    )
