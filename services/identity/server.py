"""gRPC surface of the identity service: wires its servicers into the shared runtime.

IdentityService is one gRPC service with many methods; its servicer is composed of one mixin
per area (``users_server``, ``subscriptions_server``, ``events_server``), each translating
protobuf to domain calls and back, nothing else.
"""

from __future__ import annotations

import functools
from pathlib import Path

import grpc.aio
from tidings.identity.v1 import (
    apps_service_pb2,
    apps_service_pb2_grpc,
    identity_service_pb2,
    identity_service_pb2_grpc,
)

from services.identity.api_key_auth import ApiKeyAuthenticator
from services.identity.apps_server import AppsServicer
from services.identity.events_consumer import run_events_consumer
from services.identity.events_server import EventsRpcs
from services.identity.imports import run_orphan_checks
from services.identity.imports_server import ImportsRpcs
from services.identity.key_cache import KeyCache
from services.identity.pii import configure as configure_pii
from services.identity.pii_fields import run_pii_keeper
from services.identity.receipts_consumer import run_receipts_consumer
from services.identity.segment_maintainer import run_segment_maintainer
from services.identity.segments_server import SegmentsRpcs
from services.identity.settings import IdentitySettings
from services.identity.subscriptions_server import SubscriptionsRpcs
from services.identity.users_server import UsersRpcs
from services.runtime.app import ServiceContext, ServiceSpec

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

IDENTITY_SERVICE = identity_service_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name
APPS_SERVICE = apps_service_pb2.DESCRIPTOR.services_by_name["AppsService"].full_name


class IdentityServicer(
    UsersRpcs,
    SubscriptionsRpcs,
    EventsRpcs,
    ImportsRpcs,
    SegmentsRpcs,
    identity_service_pb2_grpc.IdentityServiceServicer,
):
    """``tidings.identity.v1.IdentityService``: users, subscriptions, events, imports, segments."""

    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx


def register(server: grpc.aio.Server, ctx: ServiceContext, *, keys: KeyCache) -> list[str]:
    """Add identity's servicers to ``server``; returns their full service names."""
    identity_service_pb2_grpc.add_IdentityServiceServicer_to_server(IdentityServicer(ctx), server)
    apps_service_pb2_grpc.add_AppsServiceServicer_to_server(AppsServicer(ctx, keys), server)
    return [IDENTITY_SERVICE, APPS_SERVICE]


def spec(settings: IdentitySettings | None = None) -> ServiceSpec:
    """The identity service for the runtime; settings are read from the environment by default."""
    # One cache per process, shared by the authenticator (reads), RevokeApiKey (drops a key at
    # once here) and the LISTEN task (drops keys revoked by any replica).
    keys = KeyCache()
    settings = settings or IdentitySettings()
    # The process's box for PII attribute values (a bad setting stops start-up here).
    configure_pii(settings.identity_secret_key)
    return ServiceSpec(
        name="identity",
        settings=settings,
        migrations_dir=MIGRATIONS_DIR,
        register=functools.partial(register, keys=keys),
        authenticator=lambda ctx: ApiKeyAuthenticator(ctx, keys),
        background=[
            run_events_consumer,
            run_receipts_consumer,
            keys.listen,
            run_orphan_checks,
            run_segment_maintainer,
            run_pii_keeper,
        ],
    )
