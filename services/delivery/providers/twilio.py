"""SMS through Twilio's (or a Twilio-compatible) Messages API.

``POST /2010-04-01/Accounts/<account_sid>/Messages.json``, form-encoded ``To``, ``From`` (or
``MessagingServiceSid``) and ``Body``, HTTP basic auth with the account SID and auth token.

Credentials: ``account_sid``, ``auth_token``, and ``from_number`` (E.164 or an alphanumeric
sender id) or ``messaging_service_sid``; optional ``status_callback`` (Twilio posts delivery
reports there instead of to Tidings' own per-message callback) and ``endpoint``.

Answers: 201 is SENT (the ``sid``); Twilio error codes 21211 (invalid 'To' number), 21614 (not
a mobile number) and 21610 (the recipient replied STOP) fail and mark the number dead; 429 (and
error 20429) and 5xx are RETRY; any other 4xx fails.
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

__all__ = ["DEAD_NUMBER_CODES", "DEFAULT_ENDPOINT", "TwilioSmsAdapter"]

DEFAULT_ENDPOINT = "https://api.twilio.com"
#: Twilio errors that say the number will never take an SMS from this sender.
DEAD_NUMBER_CODES = frozenset({21211, 21614, 21610})
_RATE_LIMITED_CODES = frozenset({20429, 14107})
_ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")
_SERVICE_SID = re.compile(r"MG[0-9a-fA-F]{32}")
_E164 = re.compile(r"\+[1-9]\d{6,14}")
_ALPHANUMERIC_SENDER = re.compile(r"(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}")


class TwilioSmsAdapter:
    """Sends SMS through the Twilio Messages API.

    Args:
        client: An httpx client to use (tests); one is made otherwise.
        timeout: Seconds to wait for Twilio.
    """

    name = "twilio"
    channel = Channel.SMS

    def __init__(
        self, *, client: httpx.AsyncClient | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self._http = HttpClient(client=client, timeout=timeout)

    def check_credentials(self, credentials: Mapping[str, Any]) -> None:
        _Config.parse(credentials)

    async def send(
        self, message: OutboundMessage, credentials: Mapping[str, Any]
    ) -> ProviderResult:
        try:
            config = _Config.parse(credentials)
        except CredentialsError as error:
            return not_sent(self.name, f"credentials: {error}")
        content = message.content
        if not isinstance(content, TextContent) or not content.text:
            return not_sent(self.name, "an SMS needs text content")
        form = {"To": message.recipient.address, "Body": content.text}
        if config.service_sid:
            form["MessagingServiceSid"] = config.service_sid
        else:
            form["From"] = config.from_number
        # An explicit status_callback sends Twilio's reports to the app instead of to Tidings.
        status_callback = config.status_callback or message.status_callback_url
        if status_callback:
            form["StatusCallback"] = status_callback
        answer = await self._http.request(
            self.name,
            "POST",
            f"{config.endpoint}/2010-04-01/Accounts/{config.account_sid}/Messages.json",
            data=form,
            auth=(config.account_sid, config.auth_token),
        )
        if isinstance(answer, ProviderResult):
            return answer
        return self._classify(answer)

    def _classify(self, response: httpx.Response) -> ProviderResult:
        data = json_body(response)
        if response.is_success:
            return result_for_status(self.name, response, provider_message_id=str(data.get("sid")))
        code = data.get("code")
        reason = f"{code} {data.get('message', '')}".strip() if code else ""
        if code in _RATE_LIMITED_CODES:
            return result_for_status(self.name, response, reason, outcome=Outcome.RETRY)
        return result_for_status(
            self.name, response, reason, token_invalid=code in DEAD_NUMBER_CODES
        )

    @property
    def max_in_flight(self) -> int:
        """Calls that can be on the wire at once (the connection pool's size)."""
        return self._http.max_in_flight

    async def close(self) -> None:
        await self._http.aclose()


class _Config:
    def __init__(
        self,
        endpoint: str,
        account_sid: str,
        auth_token: str,
        from_number: str,
        service_sid: str,
        status_callback: str,
    ) -> None:
        self.endpoint = endpoint
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.from_number = from_number
        self.service_sid = service_sid
        self.status_callback = status_callback

    @classmethod
    def parse(cls, credentials: Mapping[str, Any]) -> _Config:
        endpoint = endpoint_from(credentials, DEFAULT_ENDPOINT)
        account_sid = require_text(credentials, "account_sid")
        if not _ACCOUNT_SID.fullmatch(account_sid):
            raise CredentialsError("account_sid: not a Twilio account SID (AC + 32 hex digits)")
        auth_token = require_text(credentials, "auth_token")
        from_number = str(credentials.get("from_number") or "").strip()
        service_sid = str(credentials.get("messaging_service_sid") or "").strip()
        if not from_number and not service_sid:
            raise CredentialsError("from_number: required unless messaging_service_sid is set")
        if service_sid and not _SERVICE_SID.fullmatch(service_sid):
            raise CredentialsError(
                "messaging_service_sid: not a messaging service SID (MG + 32 hex digits)"
            )
        if from_number and not (
            _E164.fullmatch(from_number) or _ALPHANUMERIC_SENDER.fullmatch(from_number)
        ):
            raise CredentialsError(
                "from_number: an E.164 number (+14155550100) or an alphanumeric sender id"
            )
        status_callback = str(credentials.get("status_callback") or "").strip()
        if status_callback:
            endpoint_from(credentials, "", field="status_callback")
        return cls(endpoint, account_sid, auth_token, from_number, service_sid, status_callback)
