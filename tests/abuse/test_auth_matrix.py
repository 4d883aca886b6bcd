"""The complete auth matrix: every RPC of every Tidings service against every kind of bad caller.

The methods come from :func:`tests.abuse.rpc.all_services` (every service in the generated
code), so a new RPC or service is in every row without anyone adding it; the coverage test
asserts that the methods each row called are exactly the methods of the descriptors, and that
the running processes serve exactly those services (reflection).

Rows (each calls every method and fails naming every method whose answer is wrong):
    no key / malformed header / never-issued key / revoked key -> UNAUTHENTICATED + reason
    client key where a server key is required                   -> PERMISSION_DENIED
    app keys on AppsService, the admin key on app services      -> PERMISSION_DENIED
    server key (and client key on its allowance)               -> not refused (control row)
The "other app's key" row is tests/abuse/test_tenant_isolation.py (NOT_FOUND for B's ids).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import MethodDescriptor
from grpc_reflection.v1alpha import reflection_pb2
from tidings.identity.v1 import app_pb2, apps_service_pb2

from services.runtime.auth import PUBLIC_METHOD_PREFIXES
from tests.abuse.conftest import Stack
from tests.abuse.rpc import (
    Metadata,
    Outcome,
    all_methods,
    all_services,
    invoke,
    method_name,
    request_class,
)
from tests.e2e.processes import TEST_ADMIN_KEY
from tests.identity.conftest import ADMIN, TestApp, bearer
from tests.identity.test_auth_matrix import _reflect

METHODS = all_methods()
#: Services only the admin key may call.
ADMIN_SERVICES = frozenset({"tidings.identity.v1.AppsService"})
#: What a client key (an SDK) may call; Login/Logout only where the app allows client login.
CLIENT_ALLOWED = frozenset(
    {
        "IdentityService.CreateSubscription",
        "IdentityService.UpdateSubscription",
        "IdentityService.TrackEvents",
        "DeliveryService.ReportEngagement",
        "DeliveryService.ListInAppMessages",
    }
)
#: Answers meaning the caller was turned away or the method did not really run.
REFUSED = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
NEVER_ISSUED = "tk_server_" + "A" * 43

#: Methods each row called (the coverage test compares them with the descriptors).
_called: dict[str, set[str]] = {}


def _is_admin_service(method: MethodDescriptor) -> bool:
    return method.containing_service.full_name in ADMIN_SERVICES


async def check_row(
    stack: Stack,
    row: str,
    methods: Sequence[MethodDescriptor],
    metadata: Metadata,
    accept: Callable[[Outcome], bool],
    expected: str,
) -> None:
    """Call each method with an empty request and fail naming each wrong answer."""
    outcomes = await asyncio.gather(
        *(
            invoke(
                stack.channel_of(m.containing_service.full_name),
                m,
                request_class(m)(),
                metadata,
            )
            for m in methods
        )
    )
    _called.setdefault(row, set()).update(method_name(m) for m in methods)
    wrong = [
        f"{method_name(m)}: {outcome}"
        for m, outcome in zip(methods, outcomes, strict=True)
        if not accept(outcome)
    ]
    assert not wrong, f"{row}: expected {expected}, but:\n  " + "\n  ".join(wrong)


def unauthenticated(reason: str) -> Callable[[Outcome], bool]:
    return lambda o: o.code == grpc.StatusCode.UNAUTHENTICATED and o.reason == reason


def denied(outcome: Outcome) -> bool:
    return outcome.code == grpc.StatusCode.PERMISSION_DENIED


def not_refused(outcome: Outcome) -> bool:
    return outcome.code not in REFUSED


async def _revoked(stack: Stack, app: TestApp, scope: Any) -> Metadata:
    created = await stack.apps.CreateApiKey(
        apps_service_pb2.CreateApiKeyRequest(app_id=app.app_id, scope=scope), metadata=ADMIN
    )
    await stack.apps.RevokeApiKey(
        apps_service_pb2.RevokeApiKeyRequest(app_id=app.app_id, key_id=created.api_key.key_id),
        metadata=ADMIN,
    )
    return bearer(created.secret)


# --- UNAUTHENTICATED everywhere ------------------------------------------------------------------


async def test_no_key(stack: Stack) -> None:
    await check_row(
        stack, "no key", METHODS, (), unauthenticated("API_KEY_MISSING"), "API_KEY_MISSING"
    )


@pytest.mark.parametrize(
    "header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer two words", "tk_server_xyz"]
)
async def test_malformed_key(stack: Stack, header: str) -> None:
    await check_row(
        stack,
        "malformed",
        METHODS,
        (("authorization", header),),
        unauthenticated("API_KEY_MALFORMED"),
        "API_KEY_MALFORMED",
    )


@pytest.mark.parametrize("key", [NEVER_ISSUED, "not-a-key", TEST_ADMIN_KEY + "x", "x" * 5000])
async def test_never_issued_key(stack: Stack, key: str) -> None:
    await check_row(
        stack, "unknown", METHODS, bearer(key), unauthenticated("API_KEY_INVALID"), "INVALID"
    )


@pytest.mark.parametrize(
    "scope", [app_pb2.API_KEY_SCOPE_SERVER, app_pb2.API_KEY_SCOPE_CLIENT], ids=["server", "client"]
)
async def test_revoked_key(stack: Stack, app: TestApp, scope: Any) -> None:
    revoked = await _revoked(stack, app, scope)
    await check_row(
        stack,
        f"revoked {scope}",
        METHODS,
        revoked,
        unauthenticated("API_KEY_REVOKED"),
        "API_KEY_REVOKED",
    )


async def test_key_revoked_after_use_is_refused_everywhere_within_a_second(
    stack: Stack, app: TestApp
) -> None:
    """journey and delivery cache identity's positive answer for at most a second."""
    created = await stack.apps.CreateApiKey(
        apps_service_pb2.CreateApiKeyRequest(app_id=app.app_id, scope=app_pb2.API_KEY_SCOPE_SERVER),
        metadata=ADMIN,
    )
    key = bearer(created.secret)
    warm = [m for m in METHODS if m.name in ("ListUsers", "ListTemplates", "ListJourneys")]
    await check_row(
        stack, "before revocation", warm, key, lambda o: o.code == grpc.StatusCode.OK, "OK"
    )
    await stack.apps.RevokeApiKey(
        apps_service_pb2.RevokeApiKeyRequest(app_id=app.app_id, key_id=created.api_key.key_id),
        metadata=ADMIN,
    )
    await asyncio.sleep(1.2)
    await check_row(
        stack,
        "revoked after use",
        METHODS,
        key,
        unauthenticated("API_KEY_REVOKED"),
        "API_KEY_REVOKED",
    )


# --- PERMISSION_DENIED: the wrong kind of key ---------------------------------------------


async def test_client_key_where_a_server_key_is_required(stack: Stack, app: TestApp) -> None:
    methods = [m for m in METHODS if method_name(m) not in CLIENT_ALLOWED]
    await check_row(stack, "client key", methods, app.client, denied, "PERMISSION_DENIED")


async def test_server_key_on_admin_services(stack: Stack, app: TestApp) -> None:
    methods = [m for m in METHODS if _is_admin_service(m)]
    assert methods
    await check_row(stack, "server on admin", methods, app.server, denied, "PERMISSION_DENIED")


async def test_admin_key_on_app_services(stack: Stack) -> None:
    methods = [m for m in METHODS if not _is_admin_service(m)]
    await check_row(stack, "admin on apps", methods, ADMIN, denied, "PERMISSION_DENIED")


# --- control rows: the right key gets past auth ------------------------------------------------


async def test_right_key_is_not_refused(stack: Stack, app: TestApp) -> None:
    await check_row(
        stack,
        "server key",
        [m for m in METHODS if not _is_admin_service(m)],
        app.server,
        not_refused,
        "not refused",
    )
    await check_row(
        stack,
        "client allowance",
        [m for m in METHODS if method_name(m) in CLIENT_ALLOWED],
        app.client,
        not_refused,
        "not refused",
    )
    await check_row(
        stack,
        "admin key",
        [m for m in METHODS if _is_admin_service(m)],
        ADMIN,
        not_refused,
        "not refused",
    )


# --- coverage -----------------------------------------------------------------------------------


async def _served(stack: Stack) -> dict[str, int]:
    """Keyed services each process serves (by reflection) and their method counts."""
    served: dict[str, int] = {}
    for channel in (stack.identity_channel, stack.delivery_channel, stack.journey_channel):
        listed = await _reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
        for service in listed.list_services_response.service:
            if f"/{service.name}/".startswith(PUBLIC_METHOD_PREFIXES):
                continue
            found = await _reflect(
                channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=service.name)
            )
            package, _, short = service.name.rpartition(".")
            for raw in found.file_descriptor_response.file_descriptor_proto:
                file = descriptor_pb2.FileDescriptorProto.FromString(raw)
                if file.package == package:
                    for s in file.service:
                        if s.name == short:
                            served[service.name] = len(s.method)
    return served


async def test_zz_every_rpc_of_every_service_is_in_every_row(stack: Stack) -> None:
    """Runs last in this module: each row called exactly the descriptors' methods."""
    descriptors = {s.full_name: len(s.methods) for s in all_services()}
    assert set(descriptors) >= {
        "tidings.identity.v1.AppsService",
        "tidings.identity.v1.IdentityService",
        "tidings.delivery.v1.DeliveryService",
        "tidings.journey.v1.JourneyService",
    }
    assert await _served(stack) == descriptors
    everything = {method_name(m) for m in METHODS}
    assert len(everything) == sum(descriptors.values())
    for row in ("no key", "malformed", "unknown"):
        assert _called.get(row) == everything, f"row {row!r} missed methods"
    revoked = set().union(*(v for k, v in _called.items() if k.startswith("revoked ")))
    assert revoked == everything
    # PERMISSION_DENIED rows + control rows together cover every method for every key kind.
    assert _called["client key"] | _called["client allowance"] == everything
    assert _called["server on admin"] | _called["admin on apps"] == everything
    assert _called["server key"] | _called["admin key"] == everything
