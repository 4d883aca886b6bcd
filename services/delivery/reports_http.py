"""Providers' delivery reports over HTTP, on the tracking endpoint (``/p/...``).

* ``POST /p/twilio/<token>``: Twilio's status callback of one SMS. The worker gives Twilio this
  URL as the message's ``StatusCallback``; the token is signed like tracking links and names
  the app and the message; ``X-Twilio-Signature`` is checked with the app's auth token over
  ``TIDINGS_TRACKING_BASE_URL`` + the path.
* ``GET /p/whatsapp/<app_id>``: the Meta webhook verification (``hub.verify_token`` must be the
  channel's ``webhook_verify_token``; ``hub.challenge`` is echoed).
  ``POST /p/whatsapp/<app_id>``: status updates, ``X-Hub-Signature-256`` checked with the
  channel's ``app_secret``; messages are found by their ``wamid``.
* ``POST /p/email/<app_id>``: a bounce or complaint email (RFC 3464 DSN, RFC 5965 ARF) as the
  bounce mailbox received it, posted by whatever reads that mailbox, signed
  ``X-Tidings-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`` with the email
  channel's ``bounce_secret``; the message is found by the original ``Message-ID``.

Answers: 200 once recorded (or when the report changes nothing or names no message of the
app), 403 for a bad signature, 404 when the app has no such channel or no secret for it, 400
for a body that is not a report, 503 when the report arrived before the worker recorded the
send, or identity could not be told of a complaint (providers retry).
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Mapping
from typing import Any

from services.delivery.channel_configs import load_configs
from services.delivery.identity_client import IdentityClient
from services.delivery.providers import bounces, twilio_reports, whatsapp_reports
from services.delivery.providers.base import Channel, DeliveryReport, ReportKind
from services.delivery.reports import Applied, apply_report, find_by_provider_id
from services.delivery.secrets_box import SecretBox
from services.delivery.tracking import TrackingLinks
from services.runtime import webhooks
from services.runtime.app import ServiceContext
from services.runtime.errors import DomainError

__all__ = ["ProviderReports", "Reply"]

log = logging.getLogger(__name__)

Reply = tuple[int, str, bytes]
_OK: Reply = (200, "text/plain", b"")
_NOT_FOUND: Reply = (404, "text/plain", b"not found")
_FORBIDDEN: Reply = (403, "text/plain", b"bad signature")
_RETRY: Reply = (503, "text/plain", b"try again later")


class ProviderReports:
    """Handles ``/p/<provider>/<id>`` requests.

    Args:
        ctx: The service context (pool, clock).
        links: Reads Twilio callback tokens.
        box: Opens the channels' credentials.
        identity: Opts out the subscriptions of complaints.
        base_url: The endpoint's public base URL, which Twilio signs.
    """

    def __init__(
        self,
        ctx: ServiceContext,
        links: TrackingLinks,
        box: SecretBox,
        identity: IdentityClient,
        base_url: str,
    ) -> None:
        self._ctx = ctx
        self._links = links
        self._box = box
        self._identity = identity
        self._base = base_url.rstrip("/")

    async def handle(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> Reply:
        """Answer one request whose path starts with ``/p/``."""
        path, _, query = target.partition("?")
        parts = path.split("/")  # ['', 'p', provider, id]
        if len(parts) != 4 or not parts[3]:
            return _NOT_FOUND
        provider, name = parts[2], urllib.parse.unquote(parts[3])
        if provider == "twilio" and method == "POST":
            return await self._twilio(target, name, headers, body)
        if provider == "whatsapp" and method == "GET":
            return await self._whatsapp_verify(name, query)
        if provider == "whatsapp" and method == "POST":
            return await self._whatsapp(name, headers, body)
        if provider == "email" and method == "POST":
            return await self._email(name, headers, body)
        return _NOT_FOUND

    async def _credentials(self, app_id: str, channel: Channel) -> Mapping[str, Any] | None:
        async with self._ctx.pool.acquire() as conn:
            configs = await load_configs(conn, self._box, [app_id])
        config = configs.get((app_id, channel))
        return config.credentials if config is not None else None

    async def _twilio(
        self, target: str, token: str, headers: Mapping[str, str], body: bytes
    ) -> Reply:
        tracked = self._links.read(token, "p")
        if tracked is None:
            return _NOT_FOUND
        credentials = await self._credentials(tracked.app_id, Channel.SMS)
        if credentials is None:
            return _NOT_FOUND
        fields = urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        signed = headers.get(twilio_reports.SIGNATURE_HEADER.lower(), "")
        auth_token = str(credentials.get("auth_token", ""))
        if not twilio_reports.verify(auth_token, self._base + target, fields, signed):
            return _FORBIDDEN
        report = twilio_reports.read_status_callback(dict(fields))
        if report is None:
            return _OK
        return await self._apply(tracked.app_id, tracked.message_id, Channel.SMS, report)

    async def _whatsapp_verify(self, app_id: str, query: str) -> Reply:
        credentials = await self._credentials(app_id, Channel.WHATSAPP)
        expected = str((credentials or {}).get("webhook_verify_token", ""))
        params = dict(urllib.parse.parse_qsl(query))
        if (
            not expected
            or params.get("hub.mode") != "subscribe"
            or params.get("hub.verify_token") != expected
        ):
            return _FORBIDDEN
        return 200, "text/plain", params.get("hub.challenge", "").encode()

    async def _whatsapp(self, app_id: str, headers: Mapping[str, str], body: bytes) -> Reply:
        credentials = await self._credentials(app_id, Channel.WHATSAPP)
        secret = str((credentials or {}).get("app_secret", ""))
        if not secret:
            return _NOT_FOUND
        signed = headers.get(whatsapp_reports.SIGNATURE_HEADER.lower(), "")
        if not whatsapp_reports.verify(secret, body, signed):
            return _FORBIDDEN
        try:
            reports = whatsapp_reports.read_status_webhook(body)
        except ValueError:
            return 400, "text/plain", b"not a WhatsApp webhook"
        return await self._apply_found(app_id, Channel.WHATSAPP, reports)

    async def _email(self, app_id: str, headers: Mapping[str, str], body: bytes) -> Reply:
        credentials = await self._credentials(app_id, Channel.EMAIL)
        secret = str((credentials or {}).get("bounce_secret", ""))
        if not secret:
            return _NOT_FOUND
        signed = headers.get(webhooks.SIGNATURE_HEADER.lower(), "")
        now = self._ctx.clock().timestamp()
        if not webhooks.verify_signature(secret, signed, body, now=now):
            return _FORBIDDEN
        try:
            reports = bounces.read_bounce(body)
        except ValueError as error:
            return 400, "text/plain", str(error).encode()
        return await self._apply_found(app_id, Channel.EMAIL, reports)

    async def _apply_found(
        self, app_id: str, channel: Channel, reports: list[DeliveryReport]
    ) -> Reply:
        reply = _OK
        for report in reports:
            message_id = await find_by_provider_id(
                self._ctx.pool, app_id, channel.value, report.provider_message_id
            )
            if message_id is None:
                continue  # not ours (another tool shares the number or the bounce mailbox)
            answer = await self._apply(app_id, message_id, channel, report)
            if answer != _OK:
                reply = answer  # the others are recorded; the provider's retry is harmless
        return reply

    async def _apply(
        self, app_id: str, message_id: Any, channel: Channel, report: DeliveryReport
    ) -> Reply:
        applied, subscription_id = await apply_report(
            self._ctx.pool, app_id, message_id, channel.value, report, self._ctx.clock()
        )
        if applied is Applied.NOT_SENT_YET:
            return _RETRY
        if (
            report.kind is ReportKind.COMPLAINED
            and applied is not Applied.UNKNOWN
            and subscription_id
        ):
            # A spam complaint is the strongest unsubscribe: never mail that address again.
            try:
                await self._identity.opt_out(app_id, subscription_id, "complaint")
            except DomainError:
                log.exception("opting out subscription %s failed", subscription_id)
                return _RETRY
        return _OK
