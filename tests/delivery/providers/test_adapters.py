"""What the registry relies on: every adapter is made with no arguments, fits the protocol
(mypy checks the list's type), has its own name and channel, and closes cleanly unused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from services.delivery.providers.apns import ApnsAdapter
from services.delivery.providers.base import Channel, CredentialsError, ProviderAdapter
from services.delivery.providers.fcm import FcmAdapter
from services.delivery.providers.registry import load_adapters
from services.delivery.providers.smtp import SmtpAdapter
from services.delivery.providers.telegram import TelegramAdapter
from services.delivery.providers.twilio import TwilioSmsAdapter
from services.delivery.providers.webpush import WebPushAdapter
from services.delivery.providers.whatsapp import WhatsAppAdapter


def adapters() -> list[ProviderAdapter]:
    return [
        ApnsAdapter(),
        FcmAdapter(),
        WebPushAdapter(),
        SmtpAdapter(),
        TwilioSmsAdapter(),
        WhatsAppAdapter(),
        TelegramAdapter(),
    ]


async def test_each_adapter_has_its_own_name_and_channel() -> None:
    made = adapters()
    try:
        assert sorted(a.name for a in made) == sorted(
            ["apns", "fcm", "webpush", "smtp", "twilio", "whatsapp", "telegram"]
        )
        # Webhooks have their own tests; in-app messages have no provider.
        assert {a.channel for a in made} == set(Channel) - {Channel.WEBHOOK, Channel.IN_APP}
    finally:
        for adapter in made:
            await adapter.close()


@pytest.mark.parametrize("index", range(7))
def test_empty_credentials_name_a_missing_field(index: int) -> None:
    adapter = adapters()[index]

    with pytest.raises(CredentialsError, match=r"^\w+: required"):
        adapter.check_credentials({})


async def test_the_smtp_bound_comes_from_the_settings() -> None:
    adapters = load_adapters(SimpleNamespace(smtp_max_connections=4))
    try:
        assert getattr(adapters.get(Channel.EMAIL), "max_in_flight", None) == 4
    finally:
        await adapters.close()
