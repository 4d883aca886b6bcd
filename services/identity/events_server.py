"""IdentityService methods about events: proto in, domain call, proto out."""

from __future__ import annotations

from services.runtime.app import ServiceContext


class EventsRpcs:
    """Mixin of :class:`~services.identity.server.IdentityServicer` for events."""

    _ctx: ServiceContext
