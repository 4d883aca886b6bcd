"""A WhatsApp Cloud API server: the messages endpoint with Graph API error JSON."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from typing import Any

import httpx

from tests.delivery.providers.fakes.server import FakeHttpServer, Reply, Request

_PATH = re.compile(r"/(?P<version>v\d+\.\d+)/(?P<phone_id>\d+)/messages")

#: Graph API errors as the Cloud API sends them: (HTTP status, code, message, details).
ERRORS: dict[int, tuple[int, str, str]] = {
    131026: (400, "Message Undeliverable.", "Unable to deliver message."),
    131047: (
        400,
        "Re-engagement message",
        "Message failed to send because more than 24 hours have passed since the customer "
        "last replied to this number.",
    ),
    130429: (
        400,
        "Rate limit hit",
        "Cloud API message throughput has been reached.",
    ),
    132001: (
        404,
        "Template name does not exist in the translation",
        "template name (x) does not exist in en_US",
    ),
}


class FakeWhatsApp(FakeHttpServer):
    """One business phone number; recipients or the token can be set to misbehave.

    Attributes:
        errors: Recipient (digits) → Graph API error code to answer with (see ``ERRORS``).
        expired: Answer 190 (token expired) to every call.
        templates: Approved template names.
    """

    def __init__(self, phone_number_id: str, access_token: str) -> None:
        super().__init__()
        self.phone_number_id = phone_number_id
        self.access_token = access_token
        self.errors: dict[str, int] = {}
        self.expired = False
        self.templates: set[str] = {"order_shipped"}
        self.sent: list[dict[str, Any]] = []

    async def answer(self, request: Request) -> Reply:
        match = _PATH.fullmatch(request.path)
        if match is None or request.method != "POST":
            return _error(
                400, 100, "Unsupported post request.", "", error_type="GraphMethodException"
            )
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if token != self.access_token:
            return _error(401, 190, "Invalid OAuth access token - Cannot parse access token", "")
        if self.expired:
            return _error(
                401,
                190,
                "Error validating access token: Session has expired on Friday, 01-Mar-24.",
                "",
                subcode=463,
            )
        if match["phone_id"] != self.phone_number_id:
            return _error(
                400, 100, "Invalid parameter", "phone number id", error_type="GraphMethodException"
            )
        body = request.json()
        if body.get("messaging_product") != "whatsapp":
            return _error(400, 100, "Invalid parameter", "messaging_product is required")
        to = str(body.get("to", ""))
        if not to.isdigit():
            return _error(400, 100, "Invalid parameter", "Parameter 'to' is invalid")
        kind = body.get("type")
        if kind == "text":
            if not body.get("text", {}).get("body"):
                return _error(400, 100, "Invalid parameter", "text.body is required")
        elif kind == "template":
            template = body.get("template", {})
            if not template.get("language", {}).get("code"):
                return _error(400, 100, "Invalid parameter", "template.language is required")
            if template.get("name") not in self.templates:
                return _graph_error(132001)
        else:
            return _error(400, 100, "Invalid parameter", f"Unsupported message type {kind}")
        if to in self.errors:
            return _graph_error(self.errors[to])
        message_id = "wamid." + secrets.token_urlsafe(24)
        self.sent.append({"id": message_id, **body})
        return Reply.json(
            200,
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": to, "wa_id": to}],
                "messages": [{"id": message_id, "message_status": "accepted"}],
            },
        )

    async def verify_webhook(self, url: str, verify_token: str) -> httpx.Response:
        """The GET Meta makes when a webhook URL is configured."""
        params = {"hub.mode": "subscribe", "hub.verify_token": verify_token, "hub.challenge": "8f3"}
        async with httpx.AsyncClient() as client:
            return await client.get(url, params=params)

    async def post_statuses(
        self, url: str, app_secret: str, statuses: list[tuple[str, str, int | None]]
    ) -> httpx.Response:
        """Post a status webhook as Meta does: ``(wamid, status, error code)`` each, signed
        ``X-Hub-Signature-256`` with the app secret."""
        now = str(int(time.time()))
        items = []
        for wamid, status, code in statuses:
            item: dict[str, Any] = {
                "id": wamid,
                "status": status,
                "timestamp": now,
                "recipient_id": "14155550100",
            }
            if code is not None:
                title = ERRORS.get(code, (400, "Error", ""))[1]
                item["errors"] = [{"code": code, "title": title}]
            items.append(item)
        body = json.dumps(
            {
                "object": "whatsapp_business_account",
                "entry": [
                    {
                        "id": "102290129340398",
                        "changes": [
                            {
                                "field": "messages",
                                "value": {
                                    "messaging_product": "whatsapp",
                                    "metadata": {"phone_number_id": self.phone_number_id},
                                    "statuses": items,
                                },
                            }
                        ],
                    }
                ],
            }
        ).encode()
        mac = hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()
        async with httpx.AsyncClient() as client:
            return await client.post(
                url,
                content=body,
                headers={
                    "content-type": "application/json",
                    "x-hub-signature-256": f"sha256={mac}",
                },
            )


def _graph_error(code: int) -> Reply:
    status, message, details = ERRORS[code]
    return _error(status, code, message, details)


def _error(
    status: int,
    code: int,
    message: str,
    details: str,
    *,
    subcode: int | None = None,
    error_type: str = "OAuthException",
) -> Reply:
    error: dict[str, Any] = {
        "message": f"(#{code}) {message}" if code != 190 else message,
        "type": error_type,
        "code": code,
        "fbtrace_id": "A" + secrets.token_hex(10),
    }
    if details:
        error["error_data"] = {"messaging_product": "whatsapp", "details": details}
    if subcode is not None:
        error["error_subcode"] = subcode
    return Reply.json(status, {"error": error})
