"""Identity's user writes racing each other: each test holds a row locked in its own
transaction to line the race up, then checks that neither side deadlocks nor answers wrongly."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
from tidings.identity.v1 import identity_service_pb2 as pb
from tidings.identity.v1 import user_pb2, user_ref_pb2

from tests.db_locks import blocked_by
from tests.identity.conftest import TestApp
from tests.identity.support import create, ext, new_id, push
from tests.polling import eventually

if TYPE_CHECKING:
    from tidings.identity.v1.identity_service_pb2_grpc import IdentityServiceAsyncStub as Stub
else:
    Stub = Any


async def _deadlocks(watcher: asyncpg.Connection) -> int:
    return int(
        await watcher.fetchval(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        )
    )


async def _code(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def _by_subscription(subscription_id: str) -> user_ref_pb2.UserRef:
    return user_ref_pb2.UserRef(subscription_id=subscription_id)


# --- alias writes and erasure by a ref that a concurrent Login re-points -------------------------


async def _merge_racing(
    identity_stub: Stub, app: TestApp, identity_database: str, make_call: Any
) -> tuple[Any, str, str]:
    """Run ``make_call(subscription_id)`` while Login merges the subscription's anonymous
    holder into a known user: the call resolves the ref before the merge commits and locks
    after. Returns (the call's status code, subscription id, known user id)."""
    device = await identity_stub.CreateSubscription(create(push()), metadata=app.server)
    anonymous = uuid.UUID(device.user_id)
    # Login locks users in id order: the known user must sort after the anonymous one (ids are
    # time-ordered, so one made in the same millisecond may not).
    for _ in range(10):
        crm = new_id("crm")
        known = await identity_stub.UpsertUser(
            pb.UpsertUserRequest(ref=ext(crm), user=user_pb2.User(first_name="Ada")),
            metadata=app.server,
        )
        if anonymous < uuid.UUID(known.user.user_id):
            break
    assert anonymous < uuid.UUID(known.user.user_id)

    holder = await asyncpg.connect(identity_database)
    watcher = await asyncpg.connect(identity_database)
    try:
        held = holder.transaction()
        await held.start()
        await holder.execute(
            "SELECT 1 FROM users WHERE app_id = $1 AND user_id = $2::uuid FOR UPDATE",
            app.app_id,
            known.user.user_id,
        )
        # Login locks the anonymous holder, then waits for the known user.
        login = asyncio.ensure_future(
            identity_stub.Login(
                pb.LoginRequest(subscription_id=device.subscription_id, external_id=crm),
                metadata=app.server,
            )
        )
        holder_pid = await holder.fetchval("SELECT pg_backend_pid()")
        [login_pid] = await eventually(
            lambda: blocked_by(watcher, holder_pid), what="Login waiting for the known user"
        )
        # The call resolves the subscription to the anonymous profile and waits for its lock.
        call = asyncio.ensure_future(_code(make_call(device.subscription_id)))
        await eventually(
            lambda: blocked_by(watcher, login_pid), what="the call waiting for Login's lock"
        )
        await held.commit()
        merged = await login
        assert merged.user.user_id == known.user.user_id
        return await call, device.subscription_id, known.user.user_id
    finally:
        await holder.close()
        await watcher.close()


async def test_add_alias_by_subscription_racing_a_login_merge_reaches_the_merged_user(
    identity_stub: Stub, app: TestApp, identity_database: str
) -> None:
    value = new_id("anon")
    outcome, subscription_id, known_id = await _merge_racing(
        identity_stub,
        app,
        identity_database,
        lambda sid: identity_stub.AddAlias(
            pb.AddAliasRequest(
                ref=_by_subscription(sid), alias=user_pb2.Alias(label="device", value=value)
            ),
            metadata=app.server,
        ),
    )
    # The subscription names a live user all along: it is the merged-into one now.
    holder = await identity_stub.GetUser(
        pb.GetUserRequest(ref=_by_subscription(subscription_id)), metadata=app.server
    )
    assert holder.user_id == known_id
    assert outcome == grpc.StatusCode.OK


async def test_delete_user_by_subscription_racing_a_login_merge_is_not_not_found(
    identity_stub: Stub, app: TestApp, identity_database: str
) -> None:
    outcome, _, _ = await _merge_racing(
        identity_stub,
        app,
        identity_database,
        lambda sid: identity_stub.DeleteUser(
            pb.DeleteUserRequest(ref=_by_subscription(sid)), metadata=app.server
        ),
    )
    assert outcome == grpc.StatusCode.OK
