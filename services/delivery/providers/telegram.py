"""Telegram Bot API: ``POST /bot<token>/sendMessage``.

Credentials: ``bot_token`` (``123456:ABC...`` from @BotFather), optional ``parse_mode``
(``HTML``, ``MarkdownV2`` or ``Markdown``), optional ``endpoint`` (a local Bot API server).
The recipient's address is the chat id.

Answers: ``ok: true`` is SENT (``message_id``); 403 (the user blocked the bot, deleted their
account, or removed it from the chat) fails for good and marks the chat dead; a group that
became a supergroup (``migrate_to_chat_id``) is dead under its old id too; 429 is RETRY after
``parameters.retry_after``; other 4xx fail, 5xx retry.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import httpx

from services.delivery.providers.base import (
    Channel,
    CredentialsError,
    OutboundMessage,
    Outcome,
    ProviderResult,
    TextContent,
)
from services.delivery.providers.http import (
    DEFAULT_TIMEOUT,
    HttpClient,
    endpoint_from,
    json_body,
    not_sent,
    require_text,
    result_for_status,
)

__all__ = ["DEFAULT_ENDPOINT", "PARSE_MODES", "TelegramAdapter"]

DEFAULT_ENDPOINT = "https://api.telegram.org"
PARSE_MODES = frozenset({"HTML", "MarkdownV2", "Markdown"})
_BOT_TOKEN = re.compile(r"\d+:[A-Za-z0-9_-]+")
_CHAT_ID = re.compile(r"-?\d+|@[A-Za-z][A-Za-z0-9_]{3,}")


class TelegramAdapter:
    """Sends text messages through a Telegram bot.

    Args:
        client: An httpx client to use (tests); one is made otherwise.
        timeout: Seconds to wait for the Bot API.
    """

    name = "telegram"
    channel = Channel.TELEGRAM

    def __init__(
        self, *, client: httpx.AsyncClient | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self._http = HttpClient(client=client, timeout=timeout)

    def check_credentials(self, credentials: Mapping[str, Any]) -> None:
        _config(credentials)

    async def send(
        self, message: OutboundMessage, credentials: Mapping[str, Any]
    ) -> ProviderResult:
        try:
            endpoint, token, parse_mode = _config(credentials)
        except CredentialsError as error:
            return not_sent(self.name, f"credentials: {error}")
        content = message.content
        if not isinstance(content, TextContent) or not content.text:
            return not_sent(self.name, "a Telegram message needs text content")
        chat_id = message.recipient.address.strip()
        if not _CHAT_ID.fullmatch(chat_id):
            return ProviderResult(
                Outcome.FAILED, detail=f"{self.name}:not a chat id", token_invalid=True
            )
        body: dict[str, Any] = {"chat_id": chat_id, "text": content.text}
        if parse_mode:
            body["parse_mode"] = parse_mode
        answer = await self._http.request(
            self.name, "POST", f"{endpoint}/bot{token}/sendMessage", json=body
        )
        if isinstance(answer, ProviderResult):
            return answer
        return self._classify(answer)

    def _classify(self, response: httpx.Response) -> ProviderResult:
        data = json_body(response)
        description = str(data.get("description") or "")
        parameters = data.get("parameters")
        parameters = parameters if isinstance(parameters, dict) else {}
        if response.is_success and data.get("ok") is True:
            result = data.get("result")
            message_id = result.get("message_id") if isinstance(result, dict) else None
            return result_for_status(self.name, response, provider_message_id=str(message_id or ""))
        if response.status_code == 429:
            retry_after = parameters.get("retry_after")
            return result_for_status(
                self.name,
                response,
                description,
                retry_after=float(retry_after) if isinstance(retry_after, int | float) else None,
            )
        migrated = parameters.get("migrate_to_chat_id")
        if migrated is not None:
            return result_for_status(
                self.name,
                response,
                f"{description} (migrated to chat {migrated})",
                outcome=Outcome.FAILED,
                token_invalid=True,
            )
        if response.is_success:  # 200 without ok: true is not an acceptance
            return result_for_status(self.name, response, description, outcome=Outcome.RETRY)
        return result_for_status(
            self.name, response, description, token_invalid=response.status_code == 403
        )

    @property
    def max_in_flight(self) -> int:
        """Calls that can be on the wire at once (the connection pool's size)."""
        return self._http.max_in_flight

    async def close(self) -> None:
        await self._http.aclose()


def _config(credentials: Mapping[str, Any]) -> tuple[str, str, str]:
    endpoint = endpoint_from(credentials, DEFAULT_ENDPOINT)
    token = require_text(credentials, "bot_token")
    if not _BOT_TOKEN.fullmatch(token):
        raise CredentialsError("bot_token: not a bot token (<bot id>:<secret>)")
    parse_mode = credentials.get("parse_mode") or ""
    if parse_mode and parse_mode not in PARSE_MODES:
        raise CredentialsError(f"parse_mode: one of {', '.join(sorted(PARSE_MODES))}")
    return endpoint, token, str(parse_mode)
