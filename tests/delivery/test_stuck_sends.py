"""Stuck sends against a real database: the scheduler settles a ``sending`` row only once the
worker that claimed it is dead (its lease is gone), sends it again with the same key on a
resend-safe channel, and fails it OUTCOME_UNKNOWN on any other (at most once)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
from tidings.delivery.v1 import message_pb2
from tidings.events.v1.send_request_pb2 import SendRequest

from services.delivery import messages_store, scheduler
from services.delivery.leases import Lease
from services.delivery.messages_store import NewMessage
from services.delivery.server import MIGRATIONS_DIR
from services.runtime.db import DBConnection
from services.runtime.migrations import migrate, sources_for
from tests.conftest import temporary_database

S = message_pb2


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    async with temporary_database() as url:
        await migrate(url, sources_for("delivery", MIGRATIONS_DIR))
        yield url


def _claimed(channel: str, *, attempts: int = 1, request: bytes | None = None) -> NewMessage:
    message_id = uuid.uuid4()
    return NewMessage(
        app_id="app",
        message_id=message_id,
        idempotency_key=f"broadcast:b:{message_id}",
        user_id="u1",
        broadcast_id=None,
        state="sending",
        status=S.MESSAGE_STATUS_QUEUED,
        expire_at=None,
        request=request,
        attempts=attempts,
        channel=channel,
    )


async def _state(conn: DBConnection, message: NewMessage) -> tuple[Any, ...]:
    row = await conn.fetchrow(
        "SELECT state, dispatch, due_at IS NOT NULL AS due FROM messages WHERE message_id = $1",
        message.message_id,
    )
    events = await conn.fetch(
        "SELECT status, reason FROM message_events WHERE message_id = $1", message.message_id
    )
    assert row is not None
    return (row["state"], row["dispatch"], row["due"], [tuple(e) for e in events])


async def test_a_dead_workers_sends_are_resent_on_webhooks_and_failed_elsewhere(dsn: str) -> None:
    record = SendRequest(app_id="app", user_id="u1").SerializeToString()
    webhook = _claimed("webhook", request=record)
    sms = _claimed("sms")
    exhausted = _claimed("webhook", attempts=5, request=record)
    alive = _claimed("webhook", request=record)
    dead, living = Lease(dsn), Lease(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    try:
        ctx = SimpleNamespace(pool=pool)  # settle_stuck and requeue_due use the pool only
        now = datetime.now(UTC)
        async with pool.acquire() as conn:
            dead_key, live_key = await dead.key(), await living.key()
            assert dead_key != live_key
            await messages_store.insert_missing(conn, [webhook, sms, exhausted], now, dead_key)
            await messages_store.insert_missing(conn, [alive], now, live_key)
        later = now + timedelta(seconds=10)
        stuck_after = timedelta(seconds=5)

        # While both workers live, nothing is stuck, however old the claims.
        assert await scheduler.settle_stuck(ctx, later, stuck_after) == 0  # type: ignore[arg-type]

        await dead.close()  # the first worker dies
        assert await scheduler.settle_stuck(ctx, later, stuck_after) == 3  # type: ignore[arg-type]
        async with pool.acquire() as conn:
            deferred, failed = S.MESSAGE_STATUS_DEFERRED, S.MESSAGE_STATUS_FAILED
            assert await _state(conn, webhook) == (
                "retry_wait",
                0,
                True,
                [(deferred, "OUTCOME_UNKNOWN")],
            )
            assert await _state(conn, sms) == ("failed", 0, False, [(failed, "OUTCOME_UNKNOWN")])
            assert await _state(conn, exhausted) == (
                "failed",
                0,
                False,
                [(failed, "OUTCOME_UNKNOWN")],
            )
            # A slow or paused worker keeps its claim: it will record the answer itself.
            assert (await _state(conn, alive))[0] == "sending"

        # The resend goes back on the topic as the next dispatch, with the stored record.
        assert await scheduler.requeue_due(ctx, later) == 1  # type: ignore[arg-type]
        async with pool.acquire() as conn:
            assert (await _state(conn, webhook))[:2] == ("queued", 1)
            published = await conn.fetchval(
                "SELECT count(*) FROM outbox WHERE topic = 'delivery.requests'"
            )
            assert published == 1

        await living.close()  # the second worker dies too
        assert await scheduler.settle_stuck(ctx, later, stuck_after) == 1  # type: ignore[arg-type]
        async with pool.acquire() as conn:
            assert (await _state(conn, alive))[0] == "retry_wait"
    finally:
        await dead.close()
        await living.close()
        await pool.close()


async def test_a_requeued_message_nobody_claimed_is_published_again(dsn: str) -> None:
    record = SendRequest(app_id="app", user_id="u1").SerializeToString()
    waiting = NewMessage(
        app_id="app",
        message_id=uuid.uuid4(),
        idempotency_key="broadcast:b:lost",
        user_id="u1",
        broadcast_id=None,
        state="retry_wait",
        status=S.MESSAGE_STATUS_DEFERRED,
        expire_at=None,
        request=record,
        attempts=1,
        channel="webhook",
    )
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        ctx = SimpleNamespace(pool=pool)
        now = datetime.now(UTC)
        async with pool.acquire() as conn:
            await messages_store.insert_missing(conn, [waiting], now)
            await conn.execute("UPDATE messages SET due_at = $1", now)
        assert await scheduler.requeue_due(ctx, now) == 1  # type: ignore[arg-type]
        older_than = timedelta(seconds=8)
        # Its record is on its way: a worker claims it within seconds.
        soon = now + timedelta(seconds=2)
        assert await scheduler.redispatch_lost(ctx, soon, older_than) == 0  # type: ignore[arg-type]
        # Still queued long after: the record was lost; a new dispatch makes the old one stale.
        late = now + timedelta(seconds=10)
        assert await scheduler.redispatch_lost(ctx, late, older_than) == 1  # type: ignore[arg-type]
        async with pool.acquire() as conn:
            assert (await _state(conn, waiting))[:2] == ("queued", 2)
            payloads = await conn.fetch(
                "SELECT payload FROM outbox WHERE topic = 'delivery.requests' ORDER BY id"
            )
        assert [SendRequest.FromString(p["payload"]).dispatch for p in payloads] == [1, 2]
    finally:
        await pool.close()
