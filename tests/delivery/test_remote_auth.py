"""RemoteKeyAuthenticator against a real identity: app keys resolve, a revoked key is refused
within the cache's second, failures are never cached, identity down is UNAVAILABLE."""

from __future__ import annotations

import asyncio
import time

import pytest
from tidings.identity.v1 import apps_service_pb2

from services.runtime.auth import Scope
from services.runtime.errors import Unauthenticated, Unavailable
from services.runtime.remote_auth import RemoteKeyAuthenticator
from tests.e2e.processes import TEST_ADMIN_KEY, ServiceProcess, free_port
from tests.identity.conftest import ADMIN, create_test_app


async def test_keys_resolve_to_their_app_and_scope(
    identity_service: ServiceProcess, apps_stub: object
) -> None:
    app = await create_test_app(apps_stub)  # type: ignore[arg-type]
    auth = RemoteKeyAuthenticator(identity_service.grpc_target, TEST_ADMIN_KEY)
    try:
        server = await auth.authenticate(app.server_key)
        client = await auth.authenticate(app.client_key)
        admin = await auth.authenticate(TEST_ADMIN_KEY)
    finally:
        await auth.close()
    assert (server.app_id, server.scope) == (app.app_id, Scope.SERVER)
    assert (client.app_id, client.scope) == (app.app_id, Scope.CLIENT)
    assert (admin.app_id, admin.scope) == (None, Scope.ADMIN)


async def test_a_revoked_key_is_refused_within_the_cache_time(
    identity_service: ServiceProcess, apps_stub: object
) -> None:
    app = await create_test_app(apps_stub)  # type: ignore[arg-type]
    auth = RemoteKeyAuthenticator(identity_service.grpc_target, TEST_ADMIN_KEY, cache_seconds=1.0)
    try:
        principal = await auth.authenticate(app.server_key)
        await apps_stub.RevokeApiKey(  # type: ignore[attr-defined]
            apps_service_pb2.RevokeApiKeyRequest(app_id=app.app_id, key_id=principal.key_id),
            metadata=ADMIN,
        )
        revoked_at = time.monotonic()
        refusal: Unauthenticated | None = None
        while refusal is None:
            try:
                await auth.authenticate(app.server_key)
            except Unauthenticated as error:
                refusal = error
            else:
                await asyncio.sleep(0.05)
        assert refusal.reason == "API_KEY_REVOKED"
        assert time.monotonic() - revoked_at <= 1.2
        # A refusal is not cached as success, nor is it remembered: still refused.
        with pytest.raises(Unauthenticated):
            await auth.authenticate(app.server_key)
    finally:
        await auth.close()


async def test_unknown_keys_are_unauthenticated_every_time(
    identity_service: ServiceProcess,
) -> None:
    auth = RemoteKeyAuthenticator(identity_service.grpc_target, TEST_ADMIN_KEY)
    try:
        for _ in range(2):
            with pytest.raises(Unauthenticated) as caught:
                await auth.authenticate("tk_server_" + "Z" * 43)
            assert caught.value.reason == "API_KEY_INVALID"
    finally:
        await auth.close()


async def test_identity_down_is_unavailable_not_unauthenticated() -> None:
    auth = RemoteKeyAuthenticator(f"127.0.0.1:{free_port()}", TEST_ADMIN_KEY)
    try:
        with pytest.raises(Unavailable) as caught:
            await auth.authenticate("tk_server_" + "Z" * 43)
        assert caught.value.reason == "IDENTITY_UNAVAILABLE"
    finally:
        await auth.close()
