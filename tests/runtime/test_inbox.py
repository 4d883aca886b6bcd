"""Inbox claims against a real database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from services.runtime.db import create_pool
from services.runtime.inbox import claim_new, prune
from services.runtime.migrations import RUNTIME_MIGRATIONS, migrate


@pytest.fixture
async def pool(scratch_db: str) -> AsyncIterator[asyncpg.Pool]:
    await migrate(scratch_db, [RUNTIME_MIGRATIONS])
    pool = await create_pool(scratch_db, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


async def claim(pool: asyncpg.Pool, consumer: str, ids: list[str]) -> set[str]:
    async with pool.acquire() as conn, conn.transaction():
        return await claim_new(conn, consumer, ids)


async def test_second_claim_of_the_same_ids_returns_nothing(pool: asyncpg.Pool) -> None:
    assert await claim(pool, "c", ["e1", "e2", "e2"]) == {"e1", "e2"}
    assert await claim(pool, "c", ["e1", "e2"]) == set()
    # Only the new one of a partly seen batch.
    assert await claim(pool, "c", ["e2", "e3"]) == {"e3"}
    # Another consumer has its own scope.
    assert await claim(pool, "other", ["e1"]) == {"e1"}
    assert await claim(pool, "c", []) == set()


async def test_rolled_back_claim_can_be_claimed_again(pool: asyncpg.Pool) -> None:
    await pool.execute("CREATE TABLE effects (event_id text PRIMARY KEY)")

    class Crash(Exception):
        pass

    with pytest.raises(Crash):  # noqa: PT012 - the effect and the claim are one block
        async with pool.acquire() as conn, conn.transaction():
            fresh = await claim_new(conn, "c", ["e1", "e2"])
            await conn.executemany("INSERT INTO effects VALUES ($1)", [(i,) for i in fresh])
            raise Crash  # the effect fails after the claim: both roll back

    assert await pool.fetchval("SELECT count(*) FROM effects") == 0
    assert await claim(pool, "c", ["e1", "e2"]) == {"e1", "e2"}


async def test_concurrent_claims_of_one_id_give_it_to_one_claimant(pool: asyncpg.Pool) -> None:
    results = await asyncio.gather(*(claim(pool, "c", ["e1", "e2", "e3"]) for _ in range(4)))

    assert sorted(len(result) for result in results) == [0, 0, 0, 3]


async def test_prune_forgets_old_claims(pool: asyncpg.Pool) -> None:
    await claim(pool, "c", ["old", "new"])
    await pool.execute(
        "UPDATE inbox SET processed_at = now() - interval '2 days' WHERE event_id = 'old'"
    )

    async with pool.acquire() as conn:
        assert await prune(conn, "c", timedelta(days=1)) == 1
    assert await claim(pool, "c", ["old", "new"]) == {"old"}
