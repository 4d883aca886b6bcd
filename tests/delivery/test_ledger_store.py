"""The send ledger's SQL against a real database: a row created as the claim is created once,
however many workers race for it, and the claim by update still needs a queued row."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import asyncpg

from services.delivery import messages_store
from services.delivery.messages_store import Claim, NewMessage
from services.delivery.server import MIGRATIONS_DIR
from services.runtime.migrations import migrate, sources_for
from tests.conftest import temporary_database


def _sending(message_id: uuid.UUID, key: str) -> NewMessage:
    return NewMessage(
        app_id="app",
        message_id=message_id,
        idempotency_key=key,
        user_id="u1",
        broadcast_id=None,
        state="sending",
        status=1,
        expire_at=None,
        attempts=1,
        channel="webhook",
        journey_id="j1",
        journey_node_id="n1",
    )


async def test_only_one_racing_worker_claims_a_new_message() -> None:
    async with temporary_database() as dsn:
        await migrate(dsn, sources_for("delivery", MIGRATIONS_DIR))
        pool = await asyncpg.create_pool(dsn, min_size=4, max_size=8)
        try:
            now = datetime.now(UTC)
            message_id = uuid.uuid4()

            async def attempt() -> set[uuid.UUID]:
                async with pool.acquire() as conn:
                    return await messages_store.insert_missing(
                        conn, [_sending(message_id, "broadcast:b:u1")], now
                    )

            results = await asyncio.gather(*(attempt() for _ in range(8)))
            assert sorted(len(r) for r in results) == [0] * 7 + [1]
            # Another message id under the same idempotency key is not created either.
            async with pool.acquire() as conn:
                other = _sending(uuid.uuid4(), "broadcast:b:u1")
                assert await messages_store.insert_missing(conn, [other], now) == set()
                row = await conn.fetchrow(
                    "SELECT * FROM messages WHERE message_id = $1", message_id
                )
                assert row is not None
                assert (row["state"], row["attempts"], row["journey_id"]) == ("sending", 1, "j1")
                # A created-sending row can no longer be claimed by update.
                claim = Claim("app", message_id, 0, "u1", "webhook", "", "", 0, False)
                assert await messages_store.claim(conn, [claim], now) == set()
        finally:
            await pool.close()
