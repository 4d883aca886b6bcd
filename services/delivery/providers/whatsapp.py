"""WhatsApp Cloud API: ``POST /<version>/<phone_number_id>/messages`` with a bearer token.

Credentials: ``access_token`` (a system user's permanent token), ``phone_number_id`` (the
sending number's id in the WhatsApp Business account), optional ``api_version`` (``v22.0``)
and ``endpoint``. The recipient's address is the E.164 number.

A text message is sent as ``type: text``; content with ``whatsapp_template`` as ``type:
template`` (name, language, body parameters), the only kind WhatsApp allows outside the 24-hour
window after the customer last wrote.

Answers: 200 is SENT (``messages[0].id``). Errors are classified by Graph API error code:
131026 (the number cannot receive WhatsApp messages) fails and marks it dead; 131047 (outside
the re-engagement window: use a template) and 190 (access token expired or revoked) fail;
throttling codes (130429, 131056, 131048, 80007, 4) and transient ones (1, 2, 131000, 131016,
133004) are RETRY; anything else follows the HTTP status.
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

__all__ = [
    "DEAD_NUMBER_CODES",
    "DEFAULT_API_VERSION",
    "DEFAULT_ENDPOINT",
    "DEFAULT_TEMPLATE_LANGUAGE",
    "RETRY_CODES",
    "WhatsAppAdapter",
]

DEFAULT_ENDPOINT = "https://graph.facebook.com"
DEFAULT_API_VERSION = "v22.0"
#: The language of a template when the content names none.
DEFAULT_TEMPLATE_LANGUAGE = "en_US"
#: Graph API codes that say the number is not reachable on WhatsApp at all.
DEAD_NUMBER_CODES = frozenset({131026})
#: Rate limits and transient server errors: the same message may go through later.
RETRY_CODES = frozenset({130429, 131056, 131048, 80007, 4, 1, 2, 131000, 131016, 133004})
_API_VERSION = re.compile(r"v\d+\.\d+")
_PHONE_NUMBER_ID = re.compile(r"\d{5,20}")


class WhatsAppAdapter:
    """Sends text and template messages through the WhatsApp Cloud API.

    Args:
        client: An httpx client to use (tests); one is made otherwise.
        timeout: Seconds to wait for the Graph API.
    """

    name = "whatsapp"
    channel = Channel.WHATSAPP

    def __init__(
        self, *, client: httpx.AsyncClient | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self._http = HttpClient(client=client, timeout=timeout)

    def check_credentials(self, credentials: Mapping[str, Any]) -> None:
        _url_and_token(credentials)

    async def send(
        self, message: OutboundMessage, credentials: Mapping[str, Any]
    ) -> ProviderResult:
        try:
            url, token = _url_and_token(credentials)
        except CredentialsError as error:
            return not_sent(self.name, f"credentials: {error}")
        content = message.content
        if not isinstance(content, TextContent):
            return not_sent(self.name, "a WhatsApp message needs text or template content")
        if not content.text and not content.whatsapp_template:
            return not_sent(self.name, "a WhatsApp message needs text or a template name")
        payload = _payload(message.recipient.address, content)
        answer = await self._http.request(
            self.name, "POST", url, json=payload, headers={"authorization": f"Bearer {token}"}
        )
        if isinstance(answer, ProviderResult):
            return answer
        return self._classify(answer)

    def _classify(self, response: httpx.Response) -> ProviderResult:
        data = json_body(response)
        if response.is_success:
            messages = data.get("messages")
            first = messages[0] if isinstance(messages, list) and messages else {}
            message_id = first.get("id", "") if isinstance(first, dict) else ""
            return result_for_status(self.name, response, provider_message_id=str(message_id))
        error = data.get("error")
        error = error if isinstance(error, dict) else {}
        code = error.get("code")
        reason = f"{code} {error.get('message', '')}".strip() if code is not None else ""
        if code in RETRY_CODES:
            return result_for_status(self.name, response, reason, outcome=Outcome.RETRY)
        if isinstance(code, int) and response.status_code < 500:
            return result_for_status(
                self.name,
                response,
                reason,
                outcome=Outcome.FAILED,
                token_invalid=code in DEAD_NUMBER_CODES,
            )
        return result_for_status(self.name, response, reason)

    @property
    def max_in_flight(self) -> int:
        """Calls that can be on the wire at once (the connection pool's size)."""
        return self._http.max_in_flight

    async def close(self) -> None:
        await self._http.aclose()


def _payload(address: str, content: TextContent) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        # The Cloud API takes the number with or without "+"; its examples leave it out.
        "to": address.strip().removeprefix("+"),
    }
    if content.whatsapp_template:
        template: dict[str, Any] = {
            "name": content.whatsapp_template,
            "language": {"code": content.whatsapp_language or DEFAULT_TEMPLATE_LANGUAGE},
        }
        if content.whatsapp_parameters:
            template["components"] = [
                {
                    "type": "body",
                    "parameters": [
                        {"type": "text", "text": p} for p in content.whatsapp_parameters
                    ],
                }
            ]
        payload |= {"type": "template", "template": template}
    else:
        preview = "https://" in content.text or "http://" in content.text
        payload |= {"type": "text", "text": {"preview_url": preview, "body": content.text}}
    return payload


def _url_and_token(credentials: Mapping[str, Any]) -> tuple[str, str]:
    endpoint = endpoint_from(credentials, DEFAULT_ENDPOINT)
    token = require_text(credentials, "access_token")
    phone_number_id = require_text(credentials, "phone_number_id")
    if not _PHONE_NUMBER_ID.fullmatch(phone_number_id):
        raise CredentialsError("phone_number_id: the number's numeric id, not the number itself")
    version = str(credentials.get("api_version") or DEFAULT_API_VERSION)
    if not _API_VERSION.fullmatch(version):
        raise CredentialsError("api_version: like v22.0")
    return f"{endpoint}/{version}/{phone_number_id}/messages", token
