"""The auth matrix of DeliveryService: every RPC against every kind of caller, from descriptors.

Keys are checked by identity (RemoteKeyAuthenticator), so the rows also show that delivery
keeps identity's reasons (API_KEY_INVALID, API_KEY_REVOKED).

Rows:
    no key / malformed header / unknown key / revoked key -> UNAUTHENTICATED (every method)
    admin key                                             -> PERMISSION_DENIED (every method)
    client key, except ReportEngagement, ListInAppMessages -> PERMISSION_DENIED
    client key on those two, server key everywhere        -> not refused (an empty request is
                                                             answered, typically INVALID_ARGUMENT)
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_reflection.v1alpha import reflection_pb2
from tidings.delivery.v1 import delivery_service_pb2
from tidings.identity.v1 import app_pb2, apps_service_pb2

from services.runtime.auth import PUBLIC_METHOD_PREFIXES
from tests.e2e.processes import TEST_ADMIN_KEY, ServiceProcess
from tests.identity.conftest import ADMIN, bearer, create_test_app
from tests.identity.test_auth_matrix import (
    NEVER_ISSUED,
    Metadata,
    _reflect,
    check_row,
    not_refused,
    permission_denied,
    unauthenticated,
)

DELIVERY: ServiceDescriptor = delivery_service_pb2.DESCRIPTOR.services_by_name["DeliveryService"]
METHODS: tuple[MethodDescriptor, ...] = tuple(DELIVERY.methods)
CLIENT_METHODS = frozenset({"ReportEngagement", "ListInAppMessages"})


@dataclass(frozen=True)
class Keys:
    server: Metadata
    client: Metadata
    revoked_server: Metadata
    revoked_client: Metadata


@pytest.fixture(scope="module")
async def keys(apps_stub: object) -> Keys:
    app = await create_test_app(apps_stub)  # type: ignore[arg-type]
    revoked = []
    for scope in (app_pb2.API_KEY_SCOPE_SERVER, app_pb2.API_KEY_SCOPE_CLIENT):
        created = await apps_stub.CreateApiKey(  # type: ignore[attr-defined]
            apps_service_pb2.CreateApiKeyRequest(app_id=app.app_id, scope=scope), metadata=ADMIN
        )
        await apps_stub.RevokeApiKey(  # type: ignore[attr-defined]
            apps_service_pb2.RevokeApiKeyRequest(app_id=app.app_id, key_id=created.api_key.key_id),
            metadata=ADMIN,
        )
        revoked.append(bearer(created.secret))
    return Keys(app.server, app.client, revoked[0], revoked[1])


@pytest.fixture(scope="module")
async def channel(
    delivery_service: tuple[ServiceProcess, int],
) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(delivery_service[0].grpc_target)


async def test_matrix_covers_every_keyed_method(channel: grpc.aio.Channel) -> None:
    listed = await _reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    served = {
        s.name
        for s in listed.list_services_response.service
        if not f"/{s.name}/".startswith(PUBLIC_METHOD_PREFIXES)
    }
    assert served == {DELIVERY.full_name}
    found = await _reflect(
        channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=DELIVERY.full_name)
    )
    served_methods = 0
    for raw in found.file_descriptor_response.file_descriptor_proto:
        file = descriptor_pb2.FileDescriptorProto.FromString(raw)
        if file.package == "tidings.delivery.v1":
            served_methods += sum(len(s.method) for s in file.service if s.name == DELIVERY.name)
    assert served_methods == len(METHODS) > 0


async def test_no_key_is_unauthenticated(channel: grpc.aio.Channel) -> None:
    await check_row(channel, METHODS, (), "UNAUTHENTICATED", unauthenticated("API_KEY_MISSING"))


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer two words"])
async def test_malformed_header_is_unauthenticated(channel: grpc.aio.Channel, header: str) -> None:
    await check_row(
        channel,
        METHODS,
        (("authorization", header),),
        "UNAUTHENTICATED(API_KEY_MALFORMED)",
        unauthenticated("API_KEY_MALFORMED"),
    )


@pytest.mark.parametrize("key", [NEVER_ISSUED, "not-a-key", TEST_ADMIN_KEY + "x"])
async def test_unknown_key_is_unauthenticated(channel: grpc.aio.Channel, key: str) -> None:
    await check_row(
        channel, METHODS, bearer(key), "UNAUTHENTICATED", unauthenticated("API_KEY_INVALID")
    )


@pytest.mark.parametrize("scope", ["server", "client"])
async def test_revoked_key_is_unauthenticated(
    channel: grpc.aio.Channel, keys: Keys, scope: str
) -> None:
    await check_row(
        channel,
        METHODS,
        keys.revoked_server if scope == "server" else keys.revoked_client,
        "UNAUTHENTICATED(API_KEY_REVOKED)",
        unauthenticated("API_KEY_REVOKED"),
    )


async def test_admin_key_is_denied(channel: grpc.aio.Channel) -> None:
    await check_row(channel, METHODS, ADMIN, "PERMISSION_DENIED", permission_denied)


async def test_client_key_is_denied_outside_report_engagement(
    channel: grpc.aio.Channel, keys: Keys
) -> None:
    methods = [m for m in METHODS if m.name not in CLIENT_METHODS]
    await check_row(channel, methods, keys.client, "PERMISSION_DENIED", permission_denied)


async def test_client_key_may_report_engagement(channel: grpc.aio.Channel, keys: Keys) -> None:
    methods = [m for m in METHODS if m.name in CLIENT_METHODS]
    assert len(methods) == len(CLIENT_METHODS)
    await check_row(channel, methods, keys.client, "not refused", not_refused)


async def test_server_key_may_call_every_method(channel: grpc.aio.Channel, keys: Keys) -> None:
    await check_row(channel, METHODS, keys.server, "not refused", not_refused)
