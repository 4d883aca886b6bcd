"""The keys journey calls identity with for background work: its own per-app server key, minted
with the admin key, stored sealed, independent of the callers' keys, minted again when revoked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import grpc.aio
from tidings.identity.v1 import (
    app_pb2,
    apps_service_pb2,
    apps_service_pb2_grpc,
    segment_pb2,
    user_pb2,
)
from tidings.journey.v1 import journey_pb2 as jpb

from tests.conftest import temporary_database
from tests.e2e.processes import ServiceProcess
from tests.identity.conftest import ADMIN, TestApp, create_test_app
from tests.journey.support import (
    SendFeed,
    create_active,
    definition,
    exit_node,
    journey_process,
    journey_stub,
    node,
    seconds,
    send,
)
from tests.journey.test_lifecycle import add
from tests.journey.test_send_flow import make_users
from tests.polling import eventually

KEY_NAME = "tidings-journey"


async def _journey_keys(apps: Any, app_id: str) -> list[Any]:
    listed = await apps.ListApiKeys(
        apps_service_pb2.ListApiKeysRequest(app_id=app_id, page_size=100), metadata=ADMIN
    )
    return [k for k in listed.api_keys if k.display_name == KEY_NAME]


async def _revoke(apps: Any, app_id: str, key_id: str) -> None:
    await apps.RevokeApiKey(
        apps_service_pb2.RevokeApiKeyRequest(app_id=app_id, key_id=key_id), metadata=ADMIN
    )


async def test_background_work_runs_on_journeys_own_sealed_key_and_survives_revocations(
    identity_service: ServiceProcess, users: Any, tmp_path: Path
) -> None:
    gold = user_pb2.AttributeValue(string_value="gold")
    async with (
        grpc.aio.insecure_channel(identity_service.grpc_target) as ich,
        temporary_database() as dsn,
        journey_process(identity_service, dsn, tmp_path) as service,
        grpc.aio.insecure_channel(service.grpc_target) as jch,
        SendFeed() as feed,
    ):
        apps = apps_service_pb2_grpc.AppsServiceStub(ich)
        journeys = journey_stub(jch)
        app: TestApp = await create_test_app(apps)
        feed.app_id = app.app_id
        [first, second, third] = await make_users(users, app, 3, attributes={"plan": gold})
        # The profile is read when the customer reaches the branch: background work.
        journey = await create_active(
            journeys,
            app.server,
            definition(
                node(
                    "wait",
                    wait_for_event=jpb.WaitForEventNode(
                        event=jpb.Entry.CustomEvent(name="never"), timeout=seconds(3)
                    ),
                    next={"event": "plan", "timeout": "plan"},
                ),
                node(
                    "plan",
                    branch=jpb.BranchNode(
                        condition=segment_pb2.Condition(
                            attribute=segment_pb2.AttributeCondition(
                                field="attributes.plan",
                                operator=segment_pb2.OPERATOR_EQUALS,
                                values=[gold],
                            )
                        )
                    ),
                    next={"true": "hello", "false": "end"},
                ),
                send("hello", next="end"),
                exit_node("end"),
            ),
        )
        await add(journeys, app, journey.journey_id, [first])

        # The caller's key is revoked while the customer waits: the engine does not use it.
        caller = await apps.AuthenticateKey(
            apps_service_pb2.AuthenticateKeyRequest(secret=app.server_key), metadata=ADMIN
        )
        await _revoke(apps, app.app_id, caller.key_id)
        await feed.wait_for(1, journey.journey_id, "hello", within=30)

        # One key of journey's own, valid, stored sealed (no plaintext left anywhere).
        [own] = await _journey_keys(apps, app.app_id)
        assert not own.HasField("revoke_time")
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT app_id, key_id, secret FROM identity_keys")
            assert [(r["app_id"], r["key_id"]) for r in rows] == [(app.app_id, own.key_id)]
            assert b"tk_server" not in rows[0]["secret"]
            assert own.prefix.encode() not in rows[0]["secret"]
            assert await conn.fetchval("SELECT to_regclass('app_credentials')") is None
        finally:
            await conn.close()

        # The app revokes journey's key: the next background call mints a new one and works.
        await _revoke(apps, app.app_id, own.key_id)
        fresh = await apps.CreateApiKey(
            apps_service_pb2.CreateApiKeyRequest(
                app_id=app.app_id, scope=app_pb2.API_KEY_SCOPE_SERVER
            ),
            metadata=ADMIN,
        )
        caller_now = TestApp(app.app_id, fresh.secret, app.client_key)
        await add(journeys, caller_now, journey.journey_id, [second])
        await feed.wait_for(2, journey.journey_id, "hello", within=30)

        async def renewed() -> list[Any]:
            return [
                k for k in await _journey_keys(apps, app.app_id) if not k.HasField("revoke_time")
            ]

        [new] = await eventually(renewed, what="a new journey key")
        assert new.key_id != own.key_id
        assert {r.user_id for r in feed.of(journey.journey_id, "hello")} == {first, second}

        # Another TIDINGS_JOURNEY_SECRET_KEY: the stored key no longer opens; it is revoked
        # and replaced, and the work goes on.
        await service.kill()
        async with (
            journey_process(identity_service, dsn, tmp_path, journey_secret_key="rotated") as again,
            grpc.aio.insecure_channel(again.grpc_target) as jch2,
        ):
            await add(journey_stub(jch2), caller_now, journey.journey_id, [third])
            await feed.wait_for(3, journey.journey_id, "hello", within=30)
        keys = {k.key_id: k.HasField("revoke_time") for k in await _journey_keys(apps, app.app_id)}
        assert keys[new.key_id] is True
        assert sorted(keys.values()) == [False, True, True]
        assert len(feed.of(journey.journey_id, "hello")) == 3
