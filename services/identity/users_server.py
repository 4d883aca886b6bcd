"""IdentityService methods about users: proto in, domain call, proto out."""

from __future__ import annotations

from services.runtime.app import ServiceContext


class UsersRpcs:
    """Mixin of :class:`~services.identity.server.IdentityServicer` for users."""

    _ctx: ServiceContext
