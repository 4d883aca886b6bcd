"""TelegramAdapter against a local Bot API server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.delivery.providers.base import (
    Channel,
    CredentialsError,
    Outcome,
    PushContent,
    TextContent,
)
from services.delivery.providers.telegram import TelegramAdapter
from tests.delivery.providers.fakes.telegram import FakeTelegram
from tests.delivery.providers.support import closed_port, outbound

TOKEN = "123456789:AAH-test_token_0123456789abcdefghijk"


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram(TOKEN) as server:
        yield server


@pytest.fixture
async def adapter() -> AsyncIterator[TelegramAdapter]:
    adapter = TelegramAdapter(timeout=2)
    yield adapter
    await adapter.close()


def creds(fake: FakeTelegram, **extra: str) -> dict[str, str]:
    return {"bot_token": TOKEN, "endpoint": fake.url, **extra}


def text(value: str = "Your order shipped") -> TextContent:
    return TextContent(text=value)


async def test_sends_a_message_to_the_chat(fake: FakeTelegram, adapter: TelegramAdapter) -> None:
    result = await adapter.send(
        outbound(Channel.TELEGRAM, "4242", text("<b>Hi</b>")), creds(fake, parse_mode="HTML")
    )

    assert result.outcome is Outcome.SENT
    assert [(s.chat_id, s.text, s.parse_mode) for s in fake.sent] == [("4242", "<b>Hi</b>", "HTML")]
    assert result.provider_message_id == str(fake.sent[0].message_id)
    assert fake.received[0].path == f"/bot{TOKEN}/sendMessage"


async def test_parse_mode_is_left_out_unless_configured(
    fake: FakeTelegram, adapter: TelegramAdapter
) -> None:
    await adapter.send(outbound(Channel.TELEGRAM, "@news_channel", text()), creds(fake))

    assert "parse_mode" not in fake.received[0].json()
    assert fake.sent[0].chat_id == "@news_channel"


async def test_a_blocked_bot_fails_and_marks_the_chat_dead(
    fake: FakeTelegram, adapter: TelegramAdapter
) -> None:
    fake.blocked.add("777")

    result = await adapter.send(outbound(Channel.TELEGRAM, "777", text()), creds(fake))

    assert result.outcome is Outcome.FAILED
    assert result.token_invalid
    assert result.detail == "telegram:Forbidden: bot was blocked by the user"


async def test_flood_control_retries_after_what_telegram_says(
    fake: FakeTelegram, adapter: TelegramAdapter
) -> None:
    fake.flooded["555"] = 35

    result = await adapter.send(outbound(Channel.TELEGRAM, "555", text()), creds(fake))

    assert result.outcome is Outcome.RETRY
    assert result.retry_after == 35
    assert not result.token_invalid
    assert fake.sent == []


async def test_a_migrated_group_is_dead_under_its_old_id(
    fake: FakeTelegram, adapter: TelegramAdapter
) -> None:
    fake.migrated["-100"] = -1001234

    result = await adapter.send(outbound(Channel.TELEGRAM, "-100", text()), creds(fake))

    assert result.outcome is Outcome.FAILED
    assert result.token_invalid
    assert "-1001234" in result.detail


async def test_a_revoked_bot_token_fails_without_blaming_the_chat(
    fake: FakeTelegram, adapter: TelegramAdapter
) -> None:
    credentials = {"bot_token": "999:revoked", "endpoint": fake.url}

    result = await adapter.send(outbound(Channel.TELEGRAM, "4242", text()), credentials)

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, False)
    assert result.detail == "telegram:Unauthorized"


async def test_too_long_a_text_fails(fake: FakeTelegram, adapter: TelegramAdapter) -> None:
    result = await adapter.send(outbound(Channel.TELEGRAM, "4242", text("x" * 5000)), creds(fake))

    assert (result.outcome, result.detail) == (
        Outcome.FAILED,
        "telegram:Bad Request: message is too long",
    )


async def test_a_failing_gateway_is_retried(fake: FakeTelegram, adapter: TelegramAdapter) -> None:
    fake.failing = True

    result = await adapter.send(outbound(Channel.TELEGRAM, "4242", text()), creds(fake))

    assert (result.outcome, result.detail) == (Outcome.RETRY, "telegram:502")


async def test_an_unreachable_api_is_retried(adapter: TelegramAdapter) -> None:
    credentials = {"bot_token": TOKEN, "endpoint": f"http://127.0.0.1:{closed_port()}"}

    result = await adapter.send(outbound(Channel.TELEGRAM, "4242", text()), credentials)

    assert result.outcome is Outcome.RETRY
    assert result.detail.startswith("telegram:unreachable")


async def test_content_that_is_not_text_is_not_sent(
    fake: FakeTelegram, adapter: TelegramAdapter
) -> None:
    result = await adapter.send(
        outbound(Channel.TELEGRAM, "4242", PushContent(title="t")), creds(fake)
    )

    assert result.outcome is Outcome.FAILED
    assert fake.received == []


@pytest.mark.parametrize(
    ("credentials", "field"),
    [
        ({}, "bot_token"),
        ({"bot_token": "not-a-token"}, "bot_token"),
        ({"bot_token": TOKEN, "parse_mode": "BBCode"}, "parse_mode"),
        ({"bot_token": TOKEN, "endpoint": "ftp://example.com"}, "endpoint"),
    ],
)
def test_credentials_are_checked(credentials: dict[str, str], field: str) -> None:
    with pytest.raises(CredentialsError, match=f"^{field}:"):
        TelegramAdapter().check_credentials(credentials)


def test_good_credentials_pass() -> None:
    TelegramAdapter().check_credentials({"bot_token": TOKEN, "parse_mode": "MarkdownV2"})
