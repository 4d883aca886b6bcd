"""A Twilio Messages API server: basic auth, the form fields, and Twilio's error JSON."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from urllib.parse import urlencode

import httpx

from tests.delivery.providers.fakes.server import FakeHttpServer, Reply, Request

_PATH = re.compile(r"/2010-04-01/Accounts/(?P<sid>AC[0-9a-f]{32})/Messages\.json")
_E164 = re.compile(r"\+[1-9]\d{6,14}")


@dataclass
class Sms:
    """A message the fake accepted."""

    sid: str
    to: str
    sender: str
    service_sid: str
    body: str
    status_callback: str


class FakeTwilio(FakeHttpServer):
    """One Twilio account; numbers can be set to be refused.

    Attributes:
        landlines: Numbers Twilio knows are not mobile (21614).
        unsubscribed: Numbers that replied STOP (21610).
        throttle: Answer 429 / 20429 to everything.
    """

    def __init__(self, account_sid: str, auth_token: str) -> None:
        super().__init__()
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.landlines: set[str] = set()
        self.unsubscribed: set[str] = set()
        self.throttle = False
        self.sent: list[Sms] = []

    async def answer(self, request: Request) -> Reply:
        match = _PATH.fullmatch(request.path)
        if match is None or request.method != "POST":
            return _error(404, 20404, "The requested resource was not found")
        if request.headers.get("authorization") != _basic(self.account_sid, self.auth_token):
            return _error(401, 20003, "Authenticate")
        if match["sid"] != self.account_sid:
            return _error(403, 20003, "Permission denied")
        if self.throttle:
            return _error(429, 20429, "Too Many Requests")
        if request.headers.get("content-type") != "application/x-www-form-urlencoded":
            return _error(400, 20001, "Unsupported content type")
        form = request.form()
        to = form.get("To", "")
        body = form.get("Body", "")
        sender = form.get("From", "")
        service = form.get("MessagingServiceSid", "")
        if not to:
            return _error(400, 21604, "A 'To' phone number is required.")
        if not sender and not service:
            return _error(400, 21603, "A 'From' or 'MessagingServiceSid' parameter is required")
        if not body:
            return _error(400, 21602, "Message body is required.")
        if not _E164.fullmatch(to):
            return _error(400, 21211, f"Invalid 'To' Phone Number: {to}")
        if to in self.landlines:
            return _error(400, 21614, f"'To' number {to} is not a valid mobile number")
        if to in self.unsubscribed:
            return _error(400, 21610, "Attempt to send to unsubscribed recipient")
        sms = Sms(
            sid="SM" + secrets.token_hex(16),
            to=to,
            sender=sender,
            service_sid=service,
            body=body,
            status_callback=form.get("StatusCallback", ""),
        )
        self.sent.append(sms)
        return Reply.json(
            201,
            {
                "account_sid": self.account_sid,
                "api_version": "2010-04-01",
                "body": body,
                "direction": "outbound-api",
                "error_code": None,
                "error_message": None,
                "from": sender or None,
                "messaging_service_sid": service or None,
                "num_segments": "1",
                "sid": sms.sid,
                "status": "accepted" if service else "queued",
                "to": to,
                "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sms.sid}.json",
            },
        )

    async def report_status(
        self, sms: Sms, status: str, error_code: str = "", *, auth_token: str | None = None
    ) -> httpx.Response:
        """Post the status callback Twilio would for ``sms`` (signed with the auth token, or
        with ``auth_token`` to forge one)."""
        fields = {
            "AccountSid": self.account_sid,
            "ApiVersion": "2010-04-01",
            "From": sms.sender,
            "MessageSid": sms.sid,
            "MessageStatus": status,
            "SmsSid": sms.sid,
            "SmsStatus": status,
            "To": sms.to,
        }
        if error_code:
            fields["ErrorCode"] = error_code
        # X-Twilio-Signature: HMAC-SHA1 of the URL then each name+value, sorted by name.
        signed = sms.status_callback + "".join(k + v for k, v in sorted(fields.items()))
        mac = hmac.new((auth_token or self.auth_token).encode(), signed.encode(), hashlib.sha1)
        async with httpx.AsyncClient() as client:
            return await client.post(
                sms.status_callback,
                content=urlencode(fields),
                headers={
                    "content-type": "application/x-www-form-urlencoded",
                    "x-twilio-signature": base64.b64encode(mac.digest()).decode(),
                    "user-agent": "TwilioProxy/1.1",
                },
            )


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _error(status: int, code: int, message: str) -> Reply:
    return Reply.json(
        status,
        {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        },
    )
