"""IdentityService methods about subscriptions: proto in, domain call, proto out."""

from __future__ import annotations

from services.runtime.app import ServiceContext


class SubscriptionsRpcs:
    """Mixin of :class:`~services.identity.server.IdentityServicer` for subscriptions."""

    _ctx: ServiceContext
