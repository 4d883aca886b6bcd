"""Channel names: the proto enum, the names stored and put on receipts, and what each accepts.

Stored and published names are the adapters' :class:`~services.delivery.providers.base.Channel`
values (``ios_push``, ``email``...) plus two names that only appear in send options and
templates: ``push`` (any push channel) and ``in_app``.
"""

from __future__ import annotations

from typing import Final

from tidings.delivery.v1 import channel_pb2

from services.delivery.providers.base import Channel

__all__ = [
    "CHANNEL_NAMES",
    "CONTENT_KIND",
    "IN_APP",
    "PROVIDERS",
    "PUSH",
    "PUSH_CHANNELS",
    "SUBSCRIPTION_CHANNEL",
    "channel_from_name",
    "channel_name",
    "channel_proto",
    "content_kind_for",
    "deliverable_channels",
]

#: Any push channel (send options and templates only).
PUSH: Final = "push"
#: In-app messages (templates only, for now).
IN_APP: Final = "in_app"

#: Proto enum number -> name.
CHANNEL_NAMES: Final[dict[int, str]] = {
    channel_pb2.CHANNEL_IOS_PUSH: Channel.IOS_PUSH.value,
    channel_pb2.CHANNEL_ANDROID_PUSH: Channel.ANDROID_PUSH.value,
    channel_pb2.CHANNEL_WEB_PUSH: Channel.WEB_PUSH.value,
    channel_pb2.CHANNEL_EMAIL: Channel.EMAIL.value,
    channel_pb2.CHANNEL_SMS: Channel.SMS.value,
    channel_pb2.CHANNEL_WHATSAPP: Channel.WHATSAPP.value,
    channel_pb2.CHANNEL_TELEGRAM: Channel.TELEGRAM.value,
    channel_pb2.CHANNEL_WEBHOOK: Channel.WEBHOOK.value,
    channel_pb2.CHANNEL_IN_APP: IN_APP,
    channel_pb2.CHANNEL_PUSH: PUSH,
}
_NUMBERS: Final[dict[str, int]] = {name: number for number, name in CHANNEL_NAMES.items()}

#: The push channels ``push`` stands for.
PUSH_CHANNELS: Final[tuple[Channel, ...]] = (
    Channel.IOS_PUSH,
    Channel.ANDROID_PUSH,
    Channel.WEB_PUSH,
)

#: The provider serving each deliverable channel.
PROVIDERS: Final[dict[Channel, str]] = {
    Channel.IOS_PUSH: "apns",
    Channel.ANDROID_PUSH: "fcm",
    Channel.WEB_PUSH: "webpush",
    Channel.EMAIL: "smtp",
    Channel.SMS: "twilio",
    Channel.WHATSAPP: "whatsapp",
    Channel.TELEGRAM: "telegram",
    Channel.WEBHOOK: "webhook",
}

#: identity's SubscriptionType numbers -> the channel they are reached on (same numbering).
SUBSCRIPTION_CHANNEL: Final[dict[int, Channel]] = {
    1: Channel.IOS_PUSH,
    2: Channel.ANDROID_PUSH,
    3: Channel.WEB_PUSH,
    4: Channel.EMAIL,
    5: Channel.SMS,
    6: Channel.WHATSAPP,
    7: Channel.TELEGRAM,
}

#: The MessageContent kind (oneof field name) each channel name takes.
CONTENT_KIND: Final[dict[str, str]] = {
    Channel.IOS_PUSH.value: "push",
    Channel.ANDROID_PUSH.value: "push",
    Channel.WEB_PUSH.value: "push",
    PUSH: "push",
    Channel.EMAIL.value: "email",
    Channel.SMS.value: "text",
    Channel.WHATSAPP.value: "text",
    Channel.TELEGRAM.value: "text",
    Channel.WEBHOOK.value: "webhook",
    IN_APP: "in_app",
}


def channel_name(number: int) -> str | None:
    """The name of a proto ``Channel`` number; None for unset or unknown numbers."""
    return CHANNEL_NAMES.get(number)


def channel_proto(name: str) -> int:
    """The proto ``Channel`` number of a name (0 for an unknown name)."""
    return _NUMBERS.get(name, channel_pb2.CHANNEL_UNSPECIFIED)


def channel_from_name(name: str) -> str | None:
    """A channel name as journeys write it (``ios_push``, ``push``...), checked; None if unknown."""
    normalized = name.strip().lower()
    return normalized if normalized in _NUMBERS else None


def content_kind_for(channel: str) -> str:
    """The MessageContent kind a channel takes."""
    return CONTENT_KIND[channel]


def deliverable_channels(channel: str) -> tuple[Channel, ...]:
    """The concrete channels a send option's channel may go out on."""
    if channel == PUSH:
        return PUSH_CHANNELS
    if channel == IN_APP:
        return ()
    return (Channel(channel),)
