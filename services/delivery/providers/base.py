"""The seam between delivery's workers and the providers: one small adapter per channel.

A worker hands an adapter one rendered message and the app's credentials for that channel; the
adapter makes the provider call and classifies the answer. Everything around the call — the
send ledger, policy, retries with backoff, rate limits, dead-lettering, receipts — is the
worker's, so adapters stay small and each is tested against a local server that speaks the
provider's real protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol


class Channel(StrEnum):
    """Delivery channels; the values are identity's subscription types where one exists."""

    IOS_PUSH = "ios_push"
    ANDROID_PUSH = "android_push"
    WEB_PUSH = "web_push"
    EMAIL = "email"
    SMS = "sms"
    WHATSAPP = "whatsapp"
    TELEGRAM = "telegram"
    WEBHOOK = "webhook"
    #: No provider: the app's SDK fetches it (ListInAppMessages).
    IN_APP = "in_app"


#: Channels on which a call whose outcome is unknown (its answer was lost, or its worker died
#: during it) is made again with the same idempotency key, because the receiver turns a repeat
#: of a key into one message: a webhook receiver drops it by ``Idempotency-Key`` (the webhook
#: contract), APNs shows one notification per ``apns-collapse-id``. Every other provider would
#: deliver a repeat as a second message (Twilio, SMTP, FCM, WhatsApp, Telegram; Web Push's
#: ``Topic`` only replaces a message still pending), so there such a call is failed
#: OUTCOME_UNKNOWN instead: at most once.
RESEND_SAFE: frozenset[Channel] = frozenset({Channel.WEBHOOK, Channel.IOS_PUSH})


@dataclass(frozen=True, slots=True)
class PushContent:
    """A push notification (APNs, FCM, Web Push)."""

    title: str = ""
    body: str = ""
    image_url: str = ""
    deep_link: str = ""
    data: Mapping[str, str] = field(default_factory=dict)
    badge: int | None = None
    sound: str = ""


@dataclass(frozen=True, slots=True)
class EmailContent:
    """An email; ``unsubscribe_url`` feeds List-Unsubscribe (RFC 2369) and one-click (RFC 8058)."""

    subject: str
    html: str = ""
    text: str = ""
    from_address: str = ""
    reply_to: str = ""
    unsubscribe_url: str = ""


@dataclass(frozen=True, slots=True)
class TextContent:
    """SMS, WhatsApp or Telegram text; a WhatsApp template when ``whatsapp_template`` is set."""

    text: str = ""
    whatsapp_template: str = ""
    whatsapp_language: str = ""
    whatsapp_parameters: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WebhookContent:
    """An HTTP call to the app's endpoint."""

    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: str = ""


Content = PushContent | EmailContent | TextContent | WebhookContent


@dataclass(frozen=True, slots=True)
class Recipient:
    """Where the message goes.

    Attributes:
        address: Device token (APNs, FCM), email address, E.164 phone number, Telegram chat id,
            or the Web Push endpoint URL. Empty for webhooks (the URL is in the content).
        web_push_p256dh: Web Push: the subscription's public key (base64url).
        web_push_auth: Web Push: the subscription's auth secret (base64url).
    """

    address: str = ""
    web_push_p256dh: str = ""
    web_push_auth: str = ""


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One rendered message, ready for a provider.

    Attributes:
        message_id: Delivery's id of the message.
        idempotency_key: The send-ledger key; providers that deduplicate get it (APNs
            ``apns-id``/``apns-collapse-id`` are derived from it, webhooks get an
            ``Idempotency-Key`` header).
        ttl_seconds: How long the provider may keep trying to deliver (push), if limited.
    """

    message_id: str
    idempotency_key: str
    channel: Channel
    recipient: Recipient
    content: Content
    ttl_seconds: int | None = None
    #: Where the provider should post its delivery reports for this message (Twilio's
    #: ``StatusCallback``); empty when delivery has no public endpoint for it.
    status_callback_url: str = ""


class Outcome(StrEnum):
    """How a provider call ended."""

    SENT = "sent"  #: accepted by the provider
    FAILED = "failed"  #: refused for good (4xx other than 408/425/429): do not retry
    RETRY = "retry"  #: 408, 425, 429, 5xx, timeout, connection error: retry later


@dataclass(frozen=True, slots=True)
class ProviderResult:
    """What became of one provider call.

    Attributes:
        provider_message_id: The provider's id of the message, when it gives one.
        detail: The provider's reason, prefixed by the adapter name (``apns:Unregistered``).
        token_invalid: The token or address is dead (APNs 410, FCM UNREGISTERED, a hard
            bounce): identity disables the subscription.
        retry_after: Seconds the provider asked to wait (Retry-After), for RETRY.
        maybe_delivered: A RETRY whose request may have reached the provider: the answer was
            lost (a timeout or a dropped connection after the request went out). The worker
            repeats such a call only on channels whose receiver drops a repeat of the same
            key (:data:`RESEND_SAFE`); elsewhere it fails OUTCOME_UNKNOWN (at most once).
    """

    outcome: Outcome
    provider_message_id: str = ""
    detail: str = ""
    token_invalid: bool = False
    retry_after: float | None = None
    maybe_delivered: bool = False


class ReportKind(StrEnum):
    """What a provider's delivery report says about a message it accepted."""

    DELIVERED = "delivered"  #: reached the device, handset or mailbox
    FAILED = "failed"  #: not delivered, for a reason that says nothing about the address
    BOUNCED = "bounced"  #: not delivered: the address refused it (``token_invalid`` if dead)
    READ = "read"  #: read receipt (WhatsApp blue ticks)
    COMPLAINED = "complained"  #: the recipient reported it as spam (email feedback loop)


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """One message's fate, as a provider reported it after accepting it.

    Attributes:
        provider_message_id: The provider's id of the message (Twilio SID, WhatsApp ``wamid``,
            email ``Message-ID`` without angle brackets); empty when the report's URL names it.
        detail: The provider's words, prefixed by the adapter name (``twilio:30005``).
        token_invalid: The address is dead: identity disables the subscription.
    """

    kind: ReportKind
    provider_message_id: str = ""
    detail: str = ""
    token_invalid: bool = False


class CredentialsError(ValueError):
    """Credentials for a channel are incomplete or malformed; the message names the field."""


class ProviderAdapter(Protocol):
    """One provider. Adapters hold their HTTP/SMTP clients and are shared by a worker's tasks."""

    #: Short name used in ``detail`` and metrics (``apns``, ``fcm``, ``smtp``...).
    name: str
    #: The channel it delivers.
    channel: Channel

    def check_credentials(self, credentials: Mapping[str, Any]) -> None:
        """Validate an app's channel configuration when it is saved.

        Raises:
            CredentialsError: Naming the missing or malformed field.
        """
        ...

    async def send(
        self, message: OutboundMessage, credentials: Mapping[str, Any]
    ) -> ProviderResult:
        """Make one provider call. Never raises for provider or network errors: those are
        classified into the result (timeouts and connection errors are RETRY)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
