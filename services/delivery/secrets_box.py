"""Delivery's secrets at rest: the runtime's box under ``TIDINGS_DELIVERY_SECRET_KEY``.

Channel credentials (context ``app_id/channel``), identity keys (``identity/app_id``) and the
MAC of tracking links. See :mod:`services.runtime.secrets_box`.
"""

from __future__ import annotations

from services.runtime.secrets_box import SecretBox as _RuntimeBox
from services.runtime.secrets_box import SecretBoxError

__all__ = ["SecretBox", "SecretBoxError"]


class SecretBox(_RuntimeBox):
    """The box of delivery's key material (derivation unchanged: stored secrets still open)."""

    def __init__(self, key_material: str) -> None:
        super().__init__(
            key_material, domain="tidings-delivery", setting="TIDINGS_DELIVERY_SECRET_KEY"
        )
