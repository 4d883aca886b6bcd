"""SmtpAdapter against a real aiosmtpd server: TLS, AUTH, the message, and the reply codes."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.delivery.providers.base import (
    Channel,
    CredentialsError,
    EmailContent,
    OutboundMessage,
    Outcome,
    TextContent,
)
from services.delivery.providers.smtp import SmtpAdapter, html_to_text
from tests.delivery.providers.fakes.smtp import FakeSmtpServer
from tests.delivery.providers.fakes.tls import TlsFiles, make_self_signed
from tests.delivery.providers.support import closed_port, outbound

USERS = {"mailer": "s3cret-pass"}


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_self_signed(Path(tmp_path_factory.mktemp("smtp-tls")))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def adapter(tls: TlsFiles, clock: Clock) -> AsyncIterator[SmtpAdapter]:
    adapter = SmtpAdapter(timeout=5, tls_context=tls.client_context(), clock=clock)
    yield adapter
    await adapter.close()


@pytest.fixture
async def submission(tls: TlsFiles) -> AsyncIterator[FakeSmtpServer]:
    async with FakeSmtpServer(mode="starttls", tls=tls, users=USERS) as server:
        yield server


def creds(server: FakeSmtpServer, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "host": "localhost",
        "port": server.port,
        "security": server.mode,
        "from_address": "Acme <news@acme.example>",
    }
    if server.users:
        base |= {"username": "mailer", "password": USERS["mailer"]}
    return base | extra


def mail(to: str = "ana@example.com", key: str | None = None, **content: Any) -> OutboundMessage:
    values = {
        "subject": "Your receipt",
        "text": "Thanks for your order.",
        "html": "<p>Thanks for your <b>order</b>.</p>",
        "unsubscribe_url": "https://t.acme.example/u/abc123",
        **content,
    }
    return outbound(Channel.EMAIL, to, EmailContent(**values), key=key)


async def test_sends_over_starttls_with_auth_and_the_expected_message(
    submission: FakeSmtpServer, adapter: SmtpAdapter
) -> None:
    message = mail(reply_to="help@acme.example", key="journey-1:node-2:visit-1")

    result = await adapter.send(
        message, creds(submission, unsubscribe_mailto="unsubscribe@acme.example")
    )

    assert result.outcome is Outcome.SENT
    [received] = submission.received
    assert (received.mail_from, received.rcpt_tos) == ("news@acme.example", ["ana@example.com"])
    assert received.user == "mailer"
    assert received.encrypted
    parsed = received.message
    digest = hashlib.sha256(b"journey-1:node-2:visit-1").hexdigest()[:32]
    assert parsed["Message-ID"] == f"<{digest}@acme.example>"
    assert result.provider_message_id == f"{digest}@acme.example"
    assert parsed["From"] == "Acme <news@acme.example>"
    assert parsed["To"] == "ana@example.com"
    assert parsed["Reply-To"] == "help@acme.example"
    assert parsed["Subject"] == "Your receipt"
    assert parsed["Date"]
    assert parsed["List-Unsubscribe"] == (
        "<https://t.acme.example/u/abc123>, <mailto:unsubscribe@acme.example?subject=unsubscribe>"
    )
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert parsed.get_content_type() == "multipart/alternative"
    text, html = parsed.iter_parts()
    assert (text.get_content_type(), html.get_content_type()) == ("text/plain", "text/html")
    assert text.get_content().strip() == "Thanks for your order."
    assert html.get_content().strip() == "<p>Thanks for your <b>order</b>.</p>"


async def test_the_same_key_gives_the_same_message_id(
    submission: FakeSmtpServer, adapter: SmtpAdapter
) -> None:
    for key in ("k-1", "k-1", "k-2"):
        assert (await adapter.send(mail(key=key), creds(submission))).outcome is Outcome.SENT

    ids = [m.message["Message-ID"] for m in submission.received]
    assert ids[0] == ids[1] != ids[2]


async def test_implicit_tls(tls: TlsFiles, adapter: SmtpAdapter) -> None:
    async with FakeSmtpServer(mode="tls", tls=tls, users=USERS) as server:
        result = await adapter.send(mail(), creds(server))

        assert result.outcome is Outcome.SENT
        assert [(m.user, m.encrypted) for m in server.received] == [("mailer", True)]


async def test_a_plain_relay_without_auth_gets_a_text_part_made_from_the_html(
    adapter: SmtpAdapter,
) -> None:
    html = (
        "<html><head><style>p{color:red}</style></head><body><h1>Hello Ana</h1>"
        '<p>See <a href="https://acme.example/o/1">your order</a>.</p></body></html>'
    )
    async with FakeSmtpServer(mode="none") as relay:
        result = await adapter.send(
            mail(text="", html=html, unsubscribe_url="", from_address="ops@acme.example"),
            creds(relay, envelope_from="bounces@acme.example"),
        )

        assert result.outcome is Outcome.SENT
        [received] = relay.received
        assert received.mail_from == "bounces@acme.example"
        assert received.user is None
        parsed = received.message
        assert parsed["From"] == "ops@acme.example"
        assert "List-Unsubscribe" not in parsed
        assert "List-Unsubscribe-Post" not in parsed
        text, _ = parsed.iter_parts()
        assert text.get_content().replace("\r\n", "\n").strip() == (
            "Hello Ana\n\nSee your order (https://acme.example/o/1)."
        )


async def test_an_unknown_user_is_a_hard_bounce(
    submission: FakeSmtpServer, adapter: SmtpAdapter
) -> None:
    submission.refuse_rcpt["gone@example.com"] = "550 5.1.1 <gone@example.com>: User unknown"

    result = await adapter.send(mail("gone@example.com"), creds(submission))

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, True)
    assert result.detail == "smtp:recipient refused: 550 5.1.1 <gone@example.com>: User unknown"
    assert submission.received == []


async def test_mailbox_unavailable_without_an_enhanced_code_is_a_hard_bounce(
    submission: FakeSmtpServer, adapter: SmtpAdapter
) -> None:
    submission.refuse_rcpt["old@example.com"] = (
        "550 Requested action not taken: mailbox unavailable"
    )

    result = await adapter.send(mail("old@example.com"), creds(submission))

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, True)


async def test_a_policy_refusal_fails_without_blaming_the_address(
    submission: FakeSmtpServer, adapter: SmtpAdapter
) -> None:
    submission.refuse_rcpt["ana@example.com"] = "550 5.7.1 Service unavailable; client blocked"

    result = await adapter.send(mail(), creds(submission))

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, False)


async def test_a_temporary_refusal_is_retried_and_the_connection_kept(
    submission: FakeSmtpServer, adapter: SmtpAdapter
) -> None:
    submission.refuse_rcpt["ana@example.com"] = "450 4.2.0 Greylisted, try again later"

    result = await adapter.send(mail(), creds(submission))
    del submission.refuse_rcpt["ana@example.com"]
    again = await adapter.send(mail(), creds(submission))

    assert (result.outcome, result.token_invalid) == (Outcome.RETRY, False)
    assert result.detail == "smtp:recipient refused: 450 4.2.0 Greylisted, try again later"
    assert again.outcome is Outcome.SENT
    assert submission.connections == 1  # RSET, then the same session carried on


async def test_a_refused_message_fails(submission: FakeSmtpServer, adapter: SmtpAdapter) -> None:
    submission.refuse_data = "554 5.6.0 Message content rejected"

    result = await adapter.send(mail(), creds(submission))

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, False)
    assert result.detail == "smtp:message refused: 554 5.6.0 Message content rejected"


async def test_a_wrong_password_fails(submission: FakeSmtpServer, adapter: SmtpAdapter) -> None:
    result = await adapter.send(mail(), creds(submission, password="wrong"))

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, False)
    assert result.detail.startswith("smtp:auth: 535 ")


async def test_a_server_without_starttls_is_refused_when_starttls_is_configured(
    adapter: SmtpAdapter,
) -> None:
    async with FakeSmtpServer(mode="none") as relay:
        result = await adapter.send(mail(), creds(relay, security="starttls"))

        assert result.outcome is Outcome.FAILED
        assert relay.received == []


async def test_an_unreachable_server_is_retried(adapter: SmtpAdapter) -> None:
    credentials = {"host": "127.0.0.1", "port": closed_port(), "security": "none"}

    result = await adapter.send(mail(from_address="a@acme.example"), credentials)

    assert result.outcome is Outcome.RETRY
    assert result.detail.startswith("smtp:unreachable")


async def test_connections_are_reused(submission: FakeSmtpServer, adapter: SmtpAdapter) -> None:
    for _ in range(3):
        assert (await adapter.send(mail(), creds(submission))).outcome is Outcome.SENT

    assert submission.connections == 1
    assert len(submission.received) == 3


async def test_a_burst_never_opens_more_sessions_than_the_bound(tls: TlsFiles) -> None:
    adapter = SmtpAdapter(timeout=5, tls_context=tls.client_context(), max_connections=3)
    try:
        async with FakeSmtpServer(mode="starttls", tls=tls, users=USERS) as slow:
            slow.data_delay = 0.05  # a slow relay: transactions overlap
            results = await asyncio.gather(
                *(adapter.send(mail(f"u{n}@example.com"), creds(slow)) for n in range(12))
            )
    finally:
        await adapter.close()

    assert [r.outcome for r in results] == [Outcome.SENT] * 12
    assert adapter.max_in_flight == 3
    assert slow.connections <= 3  # sessions are only opened, never more than 3 at once
    assert slow.peak_in_data == 3


def test_the_default_bound_is_ten() -> None:
    assert SmtpAdapter().max_in_flight == 10


async def test_a_connection_the_server_closed_is_replaced_without_a_failure(
    submission: FakeSmtpServer, adapter: SmtpAdapter
) -> None:
    await adapter.send(mail(), creds(submission))
    submission.drop_connections()

    result = await adapter.send(mail(), creds(submission))

    assert result.outcome is Outcome.SENT
    assert submission.connections == 2
    assert len(submission.received) == 2


async def test_a_long_idle_connection_is_not_reused(
    submission: FakeSmtpServer, adapter: SmtpAdapter, clock: Clock
) -> None:
    await adapter.send(mail(), creds(submission))
    clock.now += 31

    await adapter.send(mail(), creds(submission))

    assert submission.connections == 2


async def test_no_from_address_anywhere_is_not_sent(
    submission: FakeSmtpServer, adapter: SmtpAdapter
) -> None:
    credentials = creds(submission)
    del credentials["from_address"]

    result = await adapter.send(mail(), credentials)

    assert result.outcome is Outcome.FAILED
    assert submission.connections == 0


@pytest.mark.parametrize("address", ["not-an-address", "ana@", "two@@example.com"])
async def test_a_malformed_address_is_dead_without_a_connection(
    submission: FakeSmtpServer, adapter: SmtpAdapter, address: str
) -> None:
    result = await adapter.send(mail(address), creds(submission))

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, True)
    assert submission.connections == 0


async def test_text_content_is_not_an_email(
    submission: FakeSmtpServer, adapter: SmtpAdapter
) -> None:
    message = outbound(Channel.EMAIL, "ana@example.com", TextContent(text="hi"))

    assert (await adapter.send(message, creds(submission))).outcome is Outcome.FAILED


@pytest.mark.parametrize(
    ("credentials", "field"),
    [
        ({}, "host"),
        ({"host": "smtp.example.com", "security": "ssl"}, "security"),
        ({"host": "smtp.example.com", "port": 70000}, "port"),
        ({"host": "smtp.example.com", "port": "abc"}, "port"),
        ({"host": "smtp.example.com", "username": "u"}, "password"),
        ({"host": "smtp.example.com", "password": "p"}, "username"),
        ({"host": "smtp.example.com", "from_address": "Acme"}, "from_address"),
        ({"host": "smtp.example.com", "unsubscribe_mailto": "x"}, "unsubscribe_mailto"),
    ],
)
def test_credentials_are_checked(credentials: dict[str, Any], field: str) -> None:
    with pytest.raises(CredentialsError, match=f"^{field}:"):
        SmtpAdapter().check_credentials(credentials)


def test_good_credentials_pass() -> None:
    SmtpAdapter().check_credentials(
        {"host": "smtp.example.com", "port": "465", "security": "tls", "from_address": "a@b.co"}
    )


def test_html_to_text_keeps_line_structure_and_drops_scripts() -> None:
    html = (
        "<div>Hi&nbsp;Ana,<br>line two</div><ul><li>one</li><li>two</li></ul><script>x()</script>"
    )

    assert html_to_text(html) == "Hi Ana,\nline two\n\none\ntwo"
