"""Small builders shared by the adapter tests."""

from __future__ import annotations

import socket
import uuid

from services.delivery.providers.base import Channel, Content, OutboundMessage, Recipient


def outbound(
    channel: Channel,
    address: str,
    content: Content,
    *,
    key: str | None = None,
    ttl_seconds: int | None = None,
    p256dh: str = "",
    auth: str = "",
) -> OutboundMessage:
    """A rendered message with unique ids (or the given idempotency key)."""
    message_id = f"msg_{uuid.uuid4().hex[:16]}"
    return OutboundMessage(
        message_id=message_id,
        idempotency_key=key or f"key-{uuid.uuid4().hex}",
        channel=channel,
        recipient=Recipient(address=address, web_push_p256dh=p256dh, web_push_auth=auth),
        content=content,
        ttl_seconds=ttl_seconds,
    )


def closed_port() -> int:
    """A loopback port nothing listens on (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
