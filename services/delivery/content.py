"""Rendered content (protobuf) to what the provider adapters take (dataclasses)."""

from __future__ import annotations

from tidings.delivery.v1 import template_pb2

from services.delivery.providers.base import (
    Content,
    EmailContent,
    PushContent,
    TextContent,
    WebhookContent,
)

__all__ = ["to_outbound_content"]


def to_outbound_content(
    content: template_pb2.MessageContent, *, unsubscribe_url: str = ""
) -> Content:
    """The adapter form of rendered ``content``.

    Raises:
        ValueError: In-app content (no adapter delivers it) or no content at all.
    """
    kind = content.WhichOneof("kind")
    if kind == "push":
        push = content.push
        return PushContent(
            title=push.title,
            body=push.body,
            image_url=push.image_url,
            deep_link=push.deep_link,
            data=dict(push.data),
            badge=push.badge or None,
            sound=push.sound,
        )
    if kind == "email":
        email = content.email
        return EmailContent(
            subject=email.subject,
            html=email.html,
            text=email.text,
            from_address=email.from_address,
            reply_to=email.reply_to,
            unsubscribe_url=unsubscribe_url,
        )
    if kind == "text":
        text = content.text
        return TextContent(
            text=text.text,
            whatsapp_template=text.whatsapp_template,
            whatsapp_language=text.whatsapp_language,
            whatsapp_parameters=tuple(text.whatsapp_parameters),
        )
    if kind == "webhook":
        hook = content.webhook
        return WebhookContent(
            method=(hook.method or "POST").upper(),
            url=hook.url,
            headers=dict(hook.headers),
            body=hook.body,
        )
    raise ValueError(f"no provider delivers {kind or 'empty'} content")
