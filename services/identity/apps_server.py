"""AppsService: apps and API keys, for the admin key."""

from __future__ import annotations

from tidings.identity.v1 import apps_service_pb2_grpc

from services.runtime.app import ServiceContext


class AppsServicer(apps_service_pb2_grpc.AppsServiceServicer):
    """``tidings.identity.v1.AppsService``: apps and API keys (admin key only)."""

    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
