"""Signed tracking links: click redirects, the email open pixel and one-click unsubscribe.

A token is ``base64url(#purpose \\n app_id \\n message_id \\n url) . base64url(mac)`` with a
16-byte HMAC-SHA256 under a key derived from ``TIDINGS_DELIVERY_SECRET_KEY``: the endpoint trusts
what the token says (which message, which URL) only if it signed it, so it is neither an open
redirect nor a way to mark other people's messages opened. The purpose (``c`` click, ``o`` open,
``u`` unsubscribe, ``p`` provider reports) is signed too: the open pixel's token, which travels
with a forwarded email, cannot unsubscribe its first recipient. Tokens signed before purposes
existed (no ``#``; the same for every purpose) are still honoured, so links in emails already
sent keep working.

Rendering an email rewrites every ``href="http(s)://..."`` of its HTML to
``<base>/c/<token>``, appends an invisible ``<base>/o/<token>`` pixel, and sets the
List-Unsubscribe URL to ``<base>/u/<token>`` (RFC 8058 one-click: a POST opts the subscription
out).
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from dataclasses import dataclass
from html import escape, unescape
from typing import Literal

from services.delivery.secrets_box import SecretBox

__all__ = ["Purpose", "Tracked", "TrackingLinks", "rewrite_html"]

#: What a token is for: click, open, unsubscribe, provider reports.
Purpose = Literal["c", "o", "u", "p"]

_HREF = re.compile(r"""(href\s*=\s*)(["'])(https?://[^"']+)\2""", re.IGNORECASE)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Tracked:
    """What a valid token says."""

    app_id: str
    message_id: uuid.UUID
    url: str


class TrackingLinks:
    """Makes and checks tracking URLs.

    Args:
        box: Signs tokens.
        base_url: The endpoint's public base URL (``TIDINGS_TRACKING_BASE_URL``).
    """

    def __init__(self, box: SecretBox, base_url: str) -> None:
        self._box = box
        self._base = base_url.rstrip("/")

    def token(self, purpose: Purpose, app_id: str, message_id: uuid.UUID, url: str = "") -> str:
        """A signed token for one purpose of a message (and a URL, for clicks)."""
        payload = f"#{purpose}\n{app_id}\n{message_id}\n{url}".encode()
        return f"{_b64(payload)}.{_b64(self._box.sign(payload))}"

    def read(self, token: str, purpose: Purpose) -> Tracked | None:
        """What ``token`` says, or None when it is not one we signed for ``purpose``."""
        body, _, mac = token.partition(".")
        try:
            payload, signature = _unb64(body), _unb64(mac)
        except (binascii.Error, ValueError):
            return None
        if not self._box.verify(payload, signature):
            return None
        try:
            text = payload.decode()
            if text.startswith("#"):
                signed_for, app_id, message_id, url = text[1:].split("\n", 3)
                if signed_for != purpose:
                    return None
            else:  # signed before purposes: one token for all of them
                app_id, message_id, url = text.split("\n", 2)
            return Tracked(app_id, uuid.UUID(message_id), url)
        except ValueError:
            return None

    def click_url(self, app_id: str, message_id: uuid.UUID, url: str) -> str:
        """The tracked redirect to ``url``."""
        return f"{self._base}/c/{self.token('c', app_id, message_id, url)}"

    def open_url(self, app_id: str, message_id: uuid.UUID) -> str:
        """The open pixel's URL."""
        return f"{self._base}/o/{self.token('o', app_id, message_id)}"

    def status_callback_url(self, app_id: str, message_id: uuid.UUID, provider: str) -> str:
        """Where ``provider`` posts the delivery reports of one message (Twilio)."""
        return f"{self._base}/p/{provider}/{self.token('p', app_id, message_id)}"

    def unsubscribe_url(self, app_id: str, message_id: uuid.UUID) -> str:
        """The one-click unsubscribe URL."""
        return f"{self._base}/u/{self.token('u', app_id, message_id)}"


def rewrite_html(html: str, links: TrackingLinks, app_id: str, message_id: uuid.UUID) -> str:
    """Track the links of an email's HTML and add the open pixel."""

    def replace(match: re.Match[str]) -> str:
        url = unescape(match.group(3))
        tracked = links.click_url(app_id, message_id, url)
        return f"{match.group(1)}{match.group(2)}{escape(tracked)}{match.group(2)}"

    rewritten = _HREF.sub(replace, html)
    pixel = (
        f'<img src="{escape(links.open_url(app_id, message_id))}" width="1" height="1" '
        'alt="" style="display:none">'
    )
    index = rewritten.lower().rfind("</body>")
    if index == -1:
        return rewritten + pixel
    return rewritten[:index] + pixel + rewritten[index:]
