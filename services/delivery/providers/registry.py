"""Builds the provider adapters, one per deliverable channel.

Each adapter lives in its own module (``providers/apns.py``...) and can be constructed with
no arguments; the few settings an adapter takes (:func:`_options`) come from the service's.
A module that is missing or fails to import is reported, not fatal: the service runs, and
messages for that channel fail with CHANNEL_UNAVAILABLE (saving its configuration is refused
the same way), so one broken adapter never takes the other channels down.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from services.delivery.providers.base import Channel, ProviderAdapter

__all__ = ["ADAPTER_CLASSES", "Adapters", "build_adapters", "load_adapters"]

log = logging.getLogger(__name__)

#: Channel -> (module, class) of its adapter.
ADAPTER_CLASSES: Mapping[Channel, tuple[str, str]] = {
    Channel.IOS_PUSH: ("services.delivery.providers.apns", "ApnsAdapter"),
    Channel.ANDROID_PUSH: ("services.delivery.providers.fcm", "FcmAdapter"),
    Channel.WEB_PUSH: ("services.delivery.providers.webpush", "WebPushAdapter"),
    Channel.EMAIL: ("services.delivery.providers.smtp", "SmtpAdapter"),
    Channel.SMS: ("services.delivery.providers.twilio", "TwilioSmsAdapter"),
    Channel.WHATSAPP: ("services.delivery.providers.whatsapp", "WhatsAppAdapter"),
    Channel.TELEGRAM: ("services.delivery.providers.telegram", "TelegramAdapter"),
    Channel.WEBHOOK: ("services.delivery.providers.webhook", "WebhookAdapter"),
}


@dataclass
class Adapters:
    """The adapters that loaded, and why the others did not."""

    by_channel: dict[Channel, ProviderAdapter] = field(default_factory=dict)
    missing: dict[Channel, str] = field(default_factory=dict)

    def get(self, channel: Channel) -> ProviderAdapter | None:
        """The adapter of ``channel``, or None when it did not load."""
        return self.by_channel.get(channel)

    async def close(self) -> None:
        """Close every adapter's connections."""
        for adapter in self.by_channel.values():
            try:
                await adapter.close()
            except Exception:  # closing one must not keep the others open
                log.exception("closing the %s adapter failed", adapter.name)


def _options(channel: Channel, settings: Any) -> dict[str, Any]:
    """The constructor arguments ``channel``'s adapter takes from the settings."""
    if channel is Channel.EMAIL:
        bound = getattr(settings, "smtp_max_connections", None)
        if isinstance(bound, int):
            return {"max_connections": bound}
    return {}


def load_adapters(settings: Any = None) -> Adapters:
    """Import and construct every adapter; records the failures instead of raising.

    Args:
        settings: The delivery settings (see :func:`_options`); defaults when None.
    """
    adapters = Adapters()
    for channel, (module_name, class_name) in ADAPTER_CLASSES.items():
        try:
            module = importlib.import_module(module_name)
            adapter = getattr(module, class_name)(**_options(channel, settings))
        except Exception as exc:  # ImportError, AttributeError, a constructor that fails
            adapters.missing[channel] = f"{module_name}.{class_name}: {type(exc).__name__}: {exc}"
            log.warning("no %s adapter: %s", channel.value, adapters.missing[channel])
            continue
        adapters.by_channel[channel] = adapter
    return adapters


def build_adapters(settings: Any = None) -> dict[Channel, ProviderAdapter]:
    """The adapters that could be built, by channel (see :func:`load_adapters`)."""
    return dict(load_adapters(settings).by_channel)
