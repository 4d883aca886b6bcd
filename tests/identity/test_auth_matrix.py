"""The auth matrix: every identity RPC against every kind of caller, built from the descriptors.

The methods come from the service descriptors, and the set of services from the running server's
reflection, so a new RPC or a new service is in the matrix without anyone adding it. Each row is
one test that calls every method with an empty request and collects the methods whose answer is
wrong, so a failure names all of them at once; each row also checks that it called every method.

Rows:
    no key / malformed header / unknown key / revoked key → UNAUTHENTICATED (every method)
    admin key on IdentityService                         → PERMISSION_DENIED
    app keys (server, client) on AppsService              → PERMISSION_DENIED
    client key on IdentityService outside its allowance   → PERMISSION_DENIED
    client key on its allowance, server key on IdentityService, admin key on AppsService
                                                          → not refused (with an empty request,
                                                            typically INVALID_ARGUMENT)
    client key on Login/Logout: PERMISSION_DENIED while the app does not allow client login,
                                not refused once it does

"Not refused" excludes UNAUTHENTICATED and PERMISSION_DENIED, and also UNIMPLEMENTED, INTERNAL
and UNKNOWN: every RPC must exist, and an empty request must be answered, not crash.

Authorization comes before request validation (AIP-211), so the PERMISSION_DENIED rows hold
even for an empty request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pb2, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from tidings.identity.v1 import (
    app_pb2,
    apps_service_pb2,
    identity_service_pb2,
)

from services.runtime.auth import PUBLIC_METHOD_PREFIXES
from tests.identity.conftest import ADMIN, bearer, create_test_app

if TYPE_CHECKING:
    from tidings.identity.v1.apps_service_pb2_grpc import AppsServiceAsyncStub as AppsStub

IDENTITY: ServiceDescriptor = identity_service_pb2.DESCRIPTOR.services_by_name["IdentityService"]
APPS: ServiceDescriptor = apps_service_pb2.DESCRIPTOR.services_by_name["AppsService"]
SERVICES = (IDENTITY, APPS)
ALL_METHODS: tuple[MethodDescriptor, ...] = tuple(m for s in SERVICES for m in s.methods)
IDENTITY_METHODS: tuple[MethodDescriptor, ...] = tuple(IDENTITY.methods)
APPS_METHODS: tuple[MethodDescriptor, ...] = tuple(APPS.methods)

#: What a client key (an SDK) may call: its own subscription and events, and Login/Logout of its
#: own subscription when the app allows client login.
CLIENT_LOGIN_METHODS = frozenset({"Login", "Logout"})
CLIENT_METHODS = frozenset({"CreateSubscription", "UpdateSubscription", "TrackEvents"})
CLIENT_ALLOWED = CLIENT_METHODS | CLIENT_LOGIN_METHODS

#: Answers that mean the caller was turned away, or the method did not really run.
REFUSED = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)

#: A well-formed secret that was never issued.
NEVER_ISSUED = "tk_server_" + "A" * 43

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Answer:
    """How one call ended."""

    code: grpc.StatusCode
    reason: str

    def __str__(self) -> str:
        return f"{self.code.name}({self.reason})" if self.reason else self.code.name


def _reason(error: grpc.aio.AioRpcError) -> str:
    # grpc-stubs types from_call for sync calls only; an AioRpcError has the same API.
    status = rpc_status.from_call(cast(Any, error))
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


async def call(channel: grpc.aio.Channel, method: MethodDescriptor, metadata: Metadata) -> Answer:
    """Call ``method`` with an empty request of its input type; any call shape."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    request_class: Any = message_factory.GetMessageClass(method.input_type)
    response_class: Any = message_factory.GetMessageClass(method.output_type)
    serializers: dict[str, Any] = {
        "request_serializer": request_class.SerializeToString,
        "response_deserializer": response_class.FromString,
    }
    request = request_class()

    def one_request() -> Iterator[Any]:
        yield request

    try:
        if method.client_streaming and method.server_streaming:
            stream = channel.stream_stream(path, **serializers)(
                one_request(), metadata=metadata, timeout=10
            )
            async for _ in stream:
                pass
        elif method.client_streaming:
            await channel.stream_unary(path, **serializers)(
                one_request(), metadata=metadata, timeout=10
            )
        elif method.server_streaming:
            async for _ in channel.unary_stream(path, **serializers)(
                request, metadata=metadata, timeout=10
            ):
                pass
        else:
            await channel.unary_unary(path, **serializers)(request, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as error:
        return Answer(error.code(), _reason(error))
    return Answer(grpc.StatusCode.OK, "")


@dataclass(frozen=True)
class Keys:
    """The callers of the matrix."""

    server: Metadata
    client: Metadata
    client_of_login_app: Metadata
    revoked_server: Metadata
    revoked_client: Metadata


async def _revoked(apps: AppsStub, app_id: str) -> list[Metadata]:
    revoked = []
    for scope in (app_pb2.API_KEY_SCOPE_SERVER, app_pb2.API_KEY_SCOPE_CLIENT):
        created = await apps.CreateApiKey(
            apps_service_pb2.CreateApiKeyRequest(app_id=app_id, scope=scope), metadata=ADMIN
        )
        await apps.RevokeApiKey(
            apps_service_pb2.RevokeApiKeyRequest(app_id=app_id, key_id=created.api_key.key_id),
            metadata=ADMIN,
        )
        revoked.append(bearer(created.secret))
    return revoked


@pytest.fixture(scope="module")
async def keys(apps_stub: AppsStub) -> Keys:
    app = await create_test_app(apps_stub)
    login_app = await create_test_app(apps_stub, app_pb2.AppSettings(allow_client_login=True))
    revoked_server, revoked_client = await _revoked(apps_stub, app.app_id)
    return Keys(
        server=app.server,
        client=app.client,
        client_of_login_app=login_app.client,
        revoked_server=revoked_server,
        revoked_client=revoked_client,
    )


async def check_row(
    channel: grpc.aio.Channel,
    methods: Sequence[MethodDescriptor],
    metadata: Metadata,
    expected: str,
    accept: Any,
) -> None:
    """Call every method in ``methods`` and fail naming each whose answer ``accept`` refuses."""
    answers = await asyncio.gather(*(call(channel, method, metadata) for method in methods))
    wrong = [
        f"{method.containing_service.name}.{method.name}: {answer}"
        for method, answer in zip(methods, answers, strict=True)
        if not accept(answer)
    ]
    assert len(answers) == len(methods)
    assert not wrong, f"expected {expected}, but:\n  " + "\n  ".join(wrong)


def unauthenticated(reason: str) -> Any:
    return lambda answer: answer == Answer(grpc.StatusCode.UNAUTHENTICATED, reason)


def permission_denied(answer: Answer) -> bool:
    return answer.code == grpc.StatusCode.PERMISSION_DENIED


def not_refused(answer: Answer) -> bool:
    return answer.code not in REFUSED


# --- coverage ----------------------------------------------------------------------------------


async def _reflect(
    channel: grpc.aio.Channel, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = [response async for response in stub.ServerReflectionInfo(iter([request]))]
    assert len(responses) == 1
    return responses[0]


async def test_matrix_covers_every_keyed_service_and_method(
    identity_channel: grpc.aio.Channel,
) -> None:
    """What the server serves (by reflection) is exactly what the matrix calls."""
    listed = await _reflect(
        identity_channel, reflection_pb2.ServerReflectionRequest(list_services="")
    )
    served = {
        service.name
        for service in listed.list_services_response.service
        if not f"/{service.name}/".startswith(PUBLIC_METHOD_PREFIXES)
    }
    assert served == {service.full_name for service in SERVICES}

    served_methods = 0
    for name in served:
        found = await _reflect(
            identity_channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)
        )
        package, _, short_name = name.rpartition(".")
        for raw in found.file_descriptor_response.file_descriptor_proto:
            file = descriptor_pb2.FileDescriptorProto.FromString(raw)
            if file.package != package:
                continue
            served_methods += sum(len(s.method) for s in file.service if s.name == short_name)
    assert served_methods == len(ALL_METHODS) == len(IDENTITY_METHODS) + len(APPS_METHODS)
    assert len(IDENTITY_METHODS) > 0
    assert len(APPS_METHODS) > 0


# --- UNAUTHENTICATED, on every method ----------------------------------------------------------


async def test_no_key_is_unauthenticated(identity_channel: grpc.aio.Channel) -> None:
    await check_row(
        identity_channel,
        ALL_METHODS,
        (),
        "UNAUTHENTICATED(API_KEY_MISSING)",
        unauthenticated("API_KEY_MISSING"),
    )


@pytest.mark.parametrize(
    "header",
    ["Basic dXNlcjpwYXNz", "Bearer", "Bearer two words", "tk_server_xyz"],
)
async def test_malformed_header_is_unauthenticated(
    identity_channel: grpc.aio.Channel, header: str
) -> None:
    await check_row(
        identity_channel,
        ALL_METHODS,
        (("authorization", header),),
        "UNAUTHENTICATED(API_KEY_MALFORMED)",
        unauthenticated("API_KEY_MALFORMED"),
    )


@pytest.mark.parametrize("key", [NEVER_ISSUED, "not-a-key", "e2e-admin-key-but-longer"])
async def test_unknown_key_is_unauthenticated(identity_channel: grpc.aio.Channel, key: str) -> None:
    await check_row(
        identity_channel,
        ALL_METHODS,
        bearer(key),
        "UNAUTHENTICATED(API_KEY_INVALID)",
        unauthenticated("API_KEY_INVALID"),
    )


@pytest.mark.parametrize("scope", ["server", "client"])
async def test_revoked_key_is_unauthenticated(
    identity_channel: grpc.aio.Channel, keys: Keys, scope: str
) -> None:
    await check_row(
        identity_channel,
        ALL_METHODS,
        keys.revoked_server if scope == "server" else keys.revoked_client,
        "UNAUTHENTICATED(API_KEY_REVOKED)",
        unauthenticated("API_KEY_REVOKED"),
    )


# --- PERMISSION_DENIED: the wrong kind of key ---------------------------------------------------


async def test_admin_key_is_denied_on_identity_service(
    identity_channel: grpc.aio.Channel,
) -> None:
    await check_row(
        identity_channel, IDENTITY_METHODS, ADMIN, "PERMISSION_DENIED", permission_denied
    )


@pytest.mark.parametrize("scope", ["server", "client"])
async def test_app_keys_are_denied_on_apps_service(
    identity_channel: grpc.aio.Channel, keys: Keys, scope: str
) -> None:
    await check_row(
        identity_channel,
        APPS_METHODS,
        keys.server if scope == "server" else keys.client,
        "PERMISSION_DENIED",
        permission_denied,
    )


async def test_client_key_is_denied_outside_its_allowance(
    identity_channel: grpc.aio.Channel, keys: Keys
) -> None:
    methods = [m for m in IDENTITY_METHODS if m.name not in CLIENT_ALLOWED]
    assert len(methods) + len(CLIENT_ALLOWED) == len(IDENTITY_METHODS)
    await check_row(identity_channel, methods, keys.client, "PERMISSION_DENIED", permission_denied)


async def test_client_key_login_is_denied_unless_the_app_allows_it(
    identity_channel: grpc.aio.Channel, keys: Keys
) -> None:
    methods = [m for m in IDENTITY_METHODS if m.name in CLIENT_LOGIN_METHODS]
    assert len(methods) == len(CLIENT_LOGIN_METHODS)
    await check_row(identity_channel, methods, keys.client, "PERMISSION_DENIED", permission_denied)


# --- allowed callers get past auth --------------------------------------------------------------


async def test_client_key_may_call_its_allowance(
    identity_channel: grpc.aio.Channel, keys: Keys
) -> None:
    methods = [m for m in IDENTITY_METHODS if m.name in CLIENT_METHODS]
    assert len(methods) == len(CLIENT_METHODS)
    await check_row(identity_channel, methods, keys.client, "not refused", not_refused)


async def test_client_key_may_log_in_when_the_app_allows_it(
    identity_channel: grpc.aio.Channel, keys: Keys
) -> None:
    methods = [m for m in IDENTITY_METHODS if m.name in CLIENT_LOGIN_METHODS]
    await check_row(identity_channel, methods, keys.client_of_login_app, "not refused", not_refused)


async def test_server_key_may_call_every_identity_method(
    identity_channel: grpc.aio.Channel, keys: Keys
) -> None:
    await check_row(identity_channel, IDENTITY_METHODS, keys.server, "not refused", not_refused)


async def test_admin_key_may_call_every_apps_method(identity_channel: grpc.aio.Channel) -> None:
    await check_row(identity_channel, APPS_METHODS, ADMIN, "not refused", not_refused)
