"""WhatsAppAdapter against a local WhatsApp Cloud API."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.delivery.providers.base import (
    Channel,
    CredentialsError,
    OutboundMessage,
    Outcome,
    TextContent,
)
from services.delivery.providers.whatsapp import WhatsAppAdapter
from tests.delivery.providers.fakes.whatsapp import FakeWhatsApp
from tests.delivery.providers.support import outbound

PHONE_ID = "106540352242922"
TOKEN = "EAAG" + secrets.token_hex(20)


@pytest.fixture
async def fake() -> AsyncIterator[FakeWhatsApp]:
    async with FakeWhatsApp(PHONE_ID, TOKEN) as server:
        yield server


@pytest.fixture
async def adapter() -> AsyncIterator[WhatsAppAdapter]:
    adapter = WhatsAppAdapter(timeout=2)
    yield adapter
    await adapter.close()


def creds(fake: FakeWhatsApp, **extra: str) -> dict[str, Any]:
    return {"access_token": TOKEN, "phone_number_id": PHONE_ID, "endpoint": fake.url, **extra}


def message(to: str, content: TextContent) -> OutboundMessage:
    return outbound(Channel.WHATSAPP, to, content)


async def test_sends_a_text_with_the_bearer_token(
    fake: FakeWhatsApp, adapter: WhatsAppAdapter
) -> None:
    result = await adapter.send(
        message("+34600111222", TextContent(text="Track it: https://t.example/1")), creds(fake)
    )

    assert result.outcome is Outcome.SENT
    [sent] = fake.sent
    assert result.provider_message_id == sent["id"]
    assert sent["to"] == "34600111222"
    assert sent["type"] == "text"
    assert sent["text"] == {"preview_url": True, "body": "Track it: https://t.example/1"}
    request = fake.received[0]
    assert request.path == f"/v22.0/{PHONE_ID}/messages"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"


async def test_sends_a_template_with_body_parameters(
    fake: FakeWhatsApp, adapter: WhatsAppAdapter
) -> None:
    content = TextContent(
        whatsapp_template="order_shipped",
        whatsapp_language="es",
        whatsapp_parameters=("Ana", "A-0042"),
    )

    result = await adapter.send(message("34600111222", content), creds(fake, api_version="v21.0"))

    assert result.outcome is Outcome.SENT
    assert fake.received[0].path.startswith("/v21.0/")
    assert fake.sent[0]["template"] == {
        "name": "order_shipped",
        "language": {"code": "es"},
        "components": [
            {
                "type": "body",
                "parameters": [{"type": "text", "text": "Ana"}, {"type": "text", "text": "A-0042"}],
            }
        ],
    }


async def test_an_unknown_template_fails(fake: FakeWhatsApp, adapter: WhatsAppAdapter) -> None:
    content = TextContent(whatsapp_template="nope")

    result = await adapter.send(message("34600111222", content), creds(fake))

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, False)
    assert result.detail.startswith("whatsapp:132001 ")
    assert fake.received[0].json()["template"]["language"] == {"code": "en_US"}


async def test_an_undeliverable_number_fails_and_is_marked(
    fake: FakeWhatsApp, adapter: WhatsAppAdapter
) -> None:
    fake.errors["34600000001"] = 131026

    result = await adapter.send(message("+34600000001", TextContent(text="hi")), creds(fake))

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, True)
    assert result.detail == "whatsapp:131026 (#131026) Message Undeliverable."


async def test_outside_the_window_fails_without_marking_the_number(
    fake: FakeWhatsApp, adapter: WhatsAppAdapter
) -> None:
    fake.errors["34600000002"] = 131047

    result = await adapter.send(message("+34600000002", TextContent(text="hi")), creds(fake))

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, False)
    assert result.detail.startswith("whatsapp:131047 ")


async def test_throughput_limit_is_retried_though_the_status_is_400(
    fake: FakeWhatsApp, adapter: WhatsAppAdapter
) -> None:
    fake.errors["34600000003"] = 130429

    result = await adapter.send(message("+34600000003", TextContent(text="hi")), creds(fake))

    assert result.outcome is Outcome.RETRY
    assert result.detail.startswith("whatsapp:130429 ")


async def test_an_expired_token_fails(fake: FakeWhatsApp, adapter: WhatsAppAdapter) -> None:
    fake.expired = True

    result = await adapter.send(message("+34600111222", TextContent(text="hi")), creds(fake))

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, False)
    assert result.detail.startswith("whatsapp:190 Error validating access token")


@pytest.mark.parametrize(
    ("credentials", "field"),
    [
        ({"phone_number_id": PHONE_ID}, "access_token"),
        ({"access_token": "t"}, "phone_number_id"),
        ({"access_token": "t", "phone_number_id": "+34 600 111 222"}, "phone_number_id"),
        ({"access_token": "t", "phone_number_id": PHONE_ID, "api_version": "22"}, "api_version"),
    ],
)
def test_credentials_are_checked(credentials: dict[str, str], field: str) -> None:
    with pytest.raises(CredentialsError, match=f"^{field}:"):
        WhatsAppAdapter().check_credentials(credentials)
