"""A real SMTP server (aiosmtpd) in the test's own event loop: STARTTLS or implicit TLS, AUTH,
and recipients or messages refused with chosen replies."""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import warnings
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, Literal, Self

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.delivery.providers.fakes.tls import TlsFiles

Mode = Literal["starttls", "tls", "none"]


@dataclass
class Mail:
    """One message the server accepted."""

    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str]
    raw: bytes
    user: str | None
    encrypted: bool

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


class FakeSmtpServer:
    """An SMTP submission server on a free loopback port.

    Args:
        mode: ``starttls`` (offers STARTTLS), ``tls`` (TLS from the first byte) or ``none``.
        tls: The certificate, for ``starttls`` and ``tls``.
        users: Accounts that may AUTH; when given, AUTH is required before MAIL.

    Attributes:
        refuse_rcpt: Address → the reply to its RCPT (``"550 5.1.1 User unknown"``).
        refuse_data: The reply to DATA instead of accepting it.
        received: The accepted messages.
        connections: How many connections were opened.
        data_delay: Seconds DATA takes (a slow relay).
        peak_in_data: The most DATA commands that were in progress at once.
    """

    def __init__(
        self,
        *,
        mode: Mode = "none",
        tls: TlsFiles | None = None,
        users: dict[str, str] | None = None,
    ) -> None:
        self.mode = mode
        self.tls = tls
        self.users = users
        self.refuse_rcpt: dict[str, str] = {}
        self.refuse_data: str | None = None
        self.received: list[Mail] = []
        self.connections = 0
        self.data_delay = 0.0
        self.in_data = 0
        self.peak_in_data = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._protocols: list[SMTP] = []

    async def __aenter__(self) -> Self:
        context = self.tls.server_context() if self.tls else None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol,
            "127.0.0.1",
            0,
            ssl=context if self.mode == "tls" else None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.drop_connections()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def drop_connections(self) -> None:
        """Close every open connection, as a server does with idle clients."""
        for protocol in self._protocols:
            if protocol.transport is not None:
                protocol.transport.close()
        self._protocols.clear()

    def _protocol(self) -> SMTP:
        self.connections += 1
        context = self.tls.server_context() if self.tls else None
        with warnings.catch_warnings():
            # aiosmtpd warns of AUTH without STARTTLS; under implicit TLS there is no need.
            warnings.simplefilter("ignore", UserWarning)
            protocol = self._make_protocol(context)
        self._protocols.append(protocol)
        return protocol

    def _make_protocol(self, context: ssl.SSLContext | None) -> SMTP:
        return SMTP(
            _Handler(self),
            hostname="mx.test",
            tls_context=context if self.mode == "starttls" else None,
            require_starttls=self.mode == "starttls",
            authenticator=self._authenticate if self.users is not None else None,
            auth_required=self.users is not None,
            # With implicit TLS the whole session is encrypted; aiosmtpd only knows STARTTLS.
            auth_require_tls=self.mode == "starttls",
            enable_SMTPUTF8=True,
        )

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword) or self.users is None:
            return AuthResult(success=False, handled=False)
        user, password = data.login.decode(), data.password.decode()
        ok = self.users.get(user) == password
        return AuthResult(success=ok, handled=False, auth_data=user if ok else None)


class _Handler:
    def __init__(self, server: FakeSmtpServer) -> None:
        self.server = server

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        refusal = self.server.refuse_rcpt.get(address)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        fake = self.server
        fake.in_data += 1
        fake.peak_in_data = max(fake.peak_in_data, fake.in_data)
        try:
            if fake.data_delay:
                await asyncio.sleep(fake.data_delay)
            return self._accept(session, envelope)
        finally:
            fake.in_data -= 1

    def _accept(self, session: Session, envelope: Envelope) -> str:
        if self.server.refuse_data is not None:
            return self.server.refuse_data
        content = envelope.original_content or b""
        self.server.received.append(
            Mail(
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                mail_options=list(envelope.mail_options),
                raw=content,
                user=session.auth_data if session.authenticated else None,
                encrypted=session.ssl is not None or self.server.mode == "tls",
            )
        )
        return f"250 2.0.0 Ok: queued as Q{len(self.server.received)}"


def client_context(tls: TlsFiles) -> ssl.SSLContext:
    """What the adapter needs to trust the fake's certificate."""
    return tls.client_context()
