"""gRPC surface of segments (CRUD, Count, ListSegmentMembers, Explain, GetSegmentMembership)."""

from __future__ import annotations

from services.runtime.app import ServiceContext


class SegmentsRpcs:
    """Mixin of :class:`~services.identity.server.IdentityServicer` for segments."""

    _ctx: ServiceContext
