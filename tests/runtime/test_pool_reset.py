"""A pooled connection goes back to the pool without a round trip, unless it holds session state.

``pg_stat_activity.query`` is the last statement each server process ran, so it shows whether
releasing a connection sent anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.runtime.db import create_pool, hold_session_state

LOCK_KEY = 424_242


async def _last_query(admin: asyncpg.Connection, pid: int) -> str:
    return str(await admin.fetchval("SELECT query FROM pg_stat_activity WHERE pid = $1", pid))


async def _lock_holders(admin: asyncpg.Connection) -> list[int]:
    rows = await admin.fetch(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = $1 AND granted",
        LOCK_KEY,
    )
    return [row["pid"] for row in rows]


@pytest.fixture
async def pool_and_admin(scratch_db: str) -> AsyncIterator[tuple[asyncpg.Pool, asyncpg.Connection]]:
    """A one-connection pool, and a connection of its own to watch it from."""
    pool = await create_pool(scratch_db, min_size=1, max_size=1)
    admin = await asyncpg.connect(scratch_db)
    try:
        yield pool, admin
    finally:
        await admin.close()
        await pool.close()


async def test_a_release_sends_nothing(
    pool_and_admin: tuple[asyncpg.Pool, asyncpg.Connection],
) -> None:
    pool, admin = pool_and_admin
    async with pool.acquire() as conn:
        pid = conn.get_server_pid()
        assert await conn.fetchval("SELECT 41 + 1") == 42
    assert await _last_query(admin, pid) == "SELECT 41 + 1"
    # The same connection comes back, usable.
    async with pool.acquire() as conn:
        assert conn.get_server_pid() == pid
        assert await conn.fetchval("SELECT 2") == 2


async def test_a_transaction_left_open_is_rolled_back(scratch_db: str) -> None:
    pool = await create_pool(scratch_db, min_size=1, max_size=1)
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    handler = loop.get_exception_handler()
    try:
        async with pool.acquire() as conn:
            await conn.execute("CREATE TABLE t (n int)")
            transaction = conn.transaction()
            await transaction.start()
            await conn.execute("INSERT INTO t VALUES (1)")
            # asyncpg reports a transaction it has to roll back on release (a bug of the holder).
            loop.set_exception_handler(lambda _loop, context: reported.append(context["message"]))
        loop.set_exception_handler(handler)
        assert [m for m in reported if m.startswith("Resetting connection with an active")]
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT count(*) FROM t") == 0
    finally:
        loop.set_exception_handler(handler)
        await pool.close()


async def test_session_state_is_reset_when_held(
    pool_and_admin: tuple[asyncpg.Pool, asyncpg.Connection],
) -> None:
    pool, admin = pool_and_admin
    async with pool.acquire() as conn:
        pid = conn.get_server_pid()
        hold_session_state(conn)
        assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY)
        await conn.execute("LISTEN somewhere")
        assert await _lock_holders(admin) == [pid]
    # Released without unlocking: the full reset ran and let go of the lock and the LISTEN.
    assert await _lock_holders(admin) == []
    assert "pg_advisory_unlock_all" in await _last_query(admin, pid)
    async with pool.acquire() as conn:
        assert conn.get_server_pid() == pid
        assert await conn.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
        assert await conn.fetchval("SELECT 3") == 3
    # Only once: the next release of the same connection sends nothing again.
    assert await _last_query(admin, pid) == "SELECT 3"
