"""The raw timer-claim ceiling the journey engine's timer throughput is divided by.

A table of due timers (one row per waiting journey instance, as DESIGN.md section 2 describes)
is drained by the claim statement a timer worker runs in a loop: delete the next batch of due
rows in ``wake_at`` order, skipping rows another worker holds, returning them to the caller.
"""

from __future__ import annotations

import asyncio

import asyncpg
from asyncpg.prepared_stmt import PreparedStatement

from bench.context import Context
from bench.figure import Figure
from bench.measure import Stopwatch
from bench.registry import benchmark

CLAIM_BATCH = 1_000

#: Concurrent claimers. One per core: with SKIP LOCKED they share the table without waiting on
#: each other, which is how several engine replicas (or workers) drain it.
CLAIMERS = 2

_SCHEMA = """
    CREATE TABLE timers (
        id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        instance_id uuid NOT NULL,
        node_id     text NOT NULL,
        wake_at     timestamptz NOT NULL
    )
"""

# Seeded server-side: a million rows never cross the wire, and only the claims are timed.
_SEED = """
    INSERT INTO timers (instance_id, node_id, wake_at)
    SELECT gen_random_uuid(), 'node-' || (g % 20), now() - interval '1 day' + g * interval '1 ms'
    FROM generate_series(1, $1) AS g
"""

_CLAIM = """
    DELETE FROM timers
    WHERE id IN (
        SELECT id FROM timers
        WHERE wake_at <= now()
        ORDER BY wake_at
        LIMIT $1
        FOR UPDATE SKIP LOCKED
    )
    RETURNING id, instance_id, node_id, wake_at
"""


async def _drain(claim: PreparedStatement[asyncpg.Record]) -> int:
    """Claims batches until none are due; returns how many rows this claimer got."""
    claimed = 0
    while rows := await claim.fetch(CLAIM_BATCH):
        claimed += len(rows)
    return claimed


@benchmark("ceiling.timer_claims_per_s")
async def timer_claims_per_s(ctx: Context) -> Figure:
    """Rows/s claimed by ``DELETE ... (SELECT ... LIMIT 1000 FOR UPDATE SKIP LOCKED) RETURNING``.

    Every row is due; ``CLAIMERS`` connections drain the table concurrently, each in autocommit
    (one transaction per claim), until it is empty.
    """
    count = ctx.sized(tiny=20_000, full=1_000_000)
    async with ctx.scratch_database() as dsn:
        conn = await asyncpg.connect(dsn)
        claimers = [await asyncpg.connect(dsn) for _ in range(CLAIMERS)]
        try:
            await conn.execute(_SCHEMA)
            await conn.execute(_SEED, count)
            # Index after the load (faster), then VACUUM so hint bits and statistics are set.
            await conn.execute("CREATE INDEX timers_wake_at ON timers (wake_at)")
            await conn.execute("VACUUM ANALYZE timers")
            # Connected and prepared before the clock starts: only claiming is timed.
            claims = [await c.prepare(_CLAIM) for c in claimers]
            with Stopwatch() as sw:
                per_claimer = await asyncio.gather(*(_drain(claim) for claim in claims))
            left = await conn.fetchval("SELECT count(*) FROM timers")
        finally:
            for c in [conn, *claimers]:
                await c.close()
    if sum(per_claimer) != count or left != 0:
        raise AssertionError(f"claimed {per_claimer}, {left} left, expected {count}")
    ctx.log(f"  {CLAIMERS} claimers took {per_claimer} rows in {sw.seconds:.2f} s")
    return Figure("ceiling.timer_claims_per_s", sw.rate(count), "rows/s")
