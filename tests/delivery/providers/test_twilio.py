"""TwilioSmsAdapter against a local Twilio Messages API."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.delivery.providers.base import Channel, CredentialsError, Outcome, TextContent
from services.delivery.providers.twilio import TwilioSmsAdapter
from tests.delivery.providers.fakes.twilio import FakeTwilio
from tests.delivery.providers.support import outbound

SID = "AC" + "0123456789abcdef" * 2
TOKEN = secrets.token_hex(16)
SERVICE = "MG" + "fedcba9876543210" * 2


@pytest.fixture
async def fake() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio(SID, TOKEN) as server:
        yield server


@pytest.fixture
async def adapter() -> AsyncIterator[TwilioSmsAdapter]:
    adapter = TwilioSmsAdapter(timeout=2)
    yield adapter
    await adapter.close()


def creds(fake: FakeTwilio, **extra: str) -> dict[str, Any]:
    base = {"account_sid": SID, "auth_token": TOKEN, "from_number": "+14155550100"}
    return {**base, "endpoint": fake.url, **extra}


def sms(to: str, body: str = "Your code is 123456") -> Any:
    return outbound(Channel.SMS, to, TextContent(text=body))


async def test_sends_with_basic_auth_and_the_form(
    fake: FakeTwilio, adapter: TwilioSmsAdapter
) -> None:
    result = await adapter.send(sms("+34600111222", "Hola Ana"), creds(fake))

    assert result.outcome is Outcome.SENT
    [sent] = fake.sent
    assert (sent.to, sent.sender, sent.body) == ("+34600111222", "+14155550100", "Hola Ana")
    assert result.provider_message_id == sent.sid
    assert sent.sid.startswith("SM")


async def test_a_messaging_service_replaces_from(
    fake: FakeTwilio, adapter: TwilioSmsAdapter
) -> None:
    credentials = creds(
        fake, messaging_service_sid=SERVICE, status_callback="https://hooks.example.com/sms"
    )
    del credentials["from_number"]

    result = await adapter.send(sms("+34600111222"), credentials)

    assert result.outcome is Outcome.SENT
    form = fake.received[0].form()
    assert form["MessagingServiceSid"] == SERVICE
    assert "From" not in form
    assert form["StatusCallback"] == "https://hooks.example.com/sms"


async def test_a_wrong_auth_token_fails_without_blaming_the_number(
    fake: FakeTwilio, adapter: TwilioSmsAdapter
) -> None:
    result = await adapter.send(sms("+34600111222"), creds(fake, auth_token="wrong"))

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, False)
    assert result.detail == "twilio:20003 Authenticate"


@pytest.mark.parametrize(
    ("number", "setup", "code"),
    [
        ("12345", None, 21211),
        ("+34911222333", "landlines", 21614),
        ("+34600999888", "unsubscribed", 21610),
    ],
)
async def test_dead_numbers_fail_and_are_marked(
    fake: FakeTwilio, adapter: TwilioSmsAdapter, number: str, setup: str | None, code: int
) -> None:
    if setup:
        getattr(fake, setup).add(number)

    result = await adapter.send(sms(number), creds(fake))

    assert result.outcome is Outcome.FAILED
    assert result.token_invalid
    assert result.detail.startswith(f"twilio:{code} ")
    assert fake.sent == []


async def test_too_many_requests_is_retried(fake: FakeTwilio, adapter: TwilioSmsAdapter) -> None:
    fake.throttle = True

    result = await adapter.send(sms("+34600111222"), creds(fake))

    assert (result.outcome, result.detail) == (Outcome.RETRY, "twilio:20429 Too Many Requests")


async def test_an_empty_body_is_refused_by_twilio(
    fake: FakeTwilio, adapter: TwilioSmsAdapter
) -> None:
    result = await adapter.send(sms("+34600111222", body=""), creds(fake))

    assert result.outcome is Outcome.FAILED
    assert fake.received == []  # refused before the call: nothing to send


@pytest.mark.parametrize(
    ("credentials", "field"),
    [
        ({"auth_token": "t", "from_number": "+14155550100"}, "account_sid"),
        ({"account_sid": "AC123", "auth_token": "t", "from_number": "+1415"}, "account_sid"),
        ({"account_sid": SID, "from_number": "+14155550100"}, "auth_token"),
        ({"account_sid": SID, "auth_token": "t"}, "from_number"),
        ({"account_sid": SID, "auth_token": "t", "from_number": "0415 555"}, "from_number"),
        ({"account_sid": SID, "auth_token": "t", "messaging_service_sid": "MG1"}, "messaging"),
        (
            {"account_sid": SID, "auth_token": "t", "from_number": "Acme", "status_callback": "x"},
            "status_callback",
        ),
    ],
)
def test_credentials_are_checked(credentials: dict[str, str], field: str) -> None:
    with pytest.raises(CredentialsError, match=f"^{field}"):
        TwilioSmsAdapter().check_credentials(credentials)


def test_an_alphanumeric_sender_is_accepted() -> None:
    TwilioSmsAdapter().check_credentials(
        {"account_sid": SID, "auth_token": "t", "from_number": "Acme"}
    )
