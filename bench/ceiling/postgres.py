"""PostgreSQL write ceilings with a bare asyncpg connection: bulk ``COPY`` and batched upserts.

Both write the customer rows of :mod:`bench.data` (10 columns: text, integer, timestamptz)
into a fresh scratch database over one connection. Rows are generated before the clock starts,
so the figures are client encoding + network + server work, as an import would see them. The
tables are ordinary logged tables (not ``UNLOGGED``): the project's tables are logged, and a
ceiling that skipped the WAL would flatter the server. The figures inherit the server's
configuration (the native stack runs with ``fsync = off``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from bench.context import Context
from bench.data import CUSTOMER_COLUMN_DDL, CUSTOMER_COLUMNS, CustomerRow, customer_rows
from bench.figure import Figure
from bench.measure import Stopwatch
from bench.registry import benchmark

UPSERT_BATCH = 1_000

_COLUMN_TYPES = ("text",) * 7 + ("integer", "bigint", "timestamptz")

# One statement per batch: ten parallel arrays unnested into rows (DESIGN.md section 6).
_UPSERT_SQL = f"""
    INSERT INTO customers ({", ".join(CUSTOMER_COLUMNS)})
    SELECT * FROM unnest({", ".join(f"${n}::{t}[]" for n, t in enumerate(_COLUMN_TYPES, 1))})
    ON CONFLICT (external_id) DO UPDATE SET
    {", ".join(f"{c} = EXCLUDED.{c}" for c in CUSTOMER_COLUMNS[1:])}
"""


async def timed_copy(
    ctx: Context,
    table: str,
    ddl: str,
    columns: Sequence[str],
    rows: Sequence[tuple[Any, ...]],
    indexes: Sequence[str] = (),
) -> float:
    """Seconds one ``copy_records_to_table`` of ``rows`` takes into a new table.

    The bare load ceiling that imports and event stores are divided by; the table lives in a
    scratch database, and every row is checked to have landed. ``indexes`` (``CREATE INDEX``
    statements) are made before the load, for a ceiling that includes keeping them.
    """
    async with ctx.scratch_database() as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            # No primary key or index unless asked: nothing but the load itself is measured.
            await conn.execute(f"CREATE TABLE {table} ({ddl})")
            for index in indexes:
                await conn.execute(index)
            with Stopwatch() as sw:
                await conn.copy_records_to_table(table, records=rows, columns=list(columns))
            copied = await conn.fetchval(f"SELECT count(*) FROM {table}")
        finally:
            await conn.close()
    if copied != len(rows):
        raise AssertionError(f"copied {copied} rows into {table}, expected {len(rows)}")
    ctx.log(f"  copied {len(rows):,} rows into {table} in {sw.seconds:.2f} s")
    return sw.seconds


@benchmark("ceiling.pg_copy_rows_per_s")
async def pg_copy_rows_per_s(ctx: Context) -> Figure:
    """Rows/s of one ``copy_records_to_table`` into a plain table without indexes."""
    count = ctx.sized(tiny=20_000, full=1_000_000)
    rows = customer_rows(range(count))
    seconds = await timed_copy(ctx, "customers", CUSTOMER_COLUMN_DDL, CUSTOMER_COLUMNS, rows)
    return Figure("ceiling.pg_copy_rows_per_s", count / seconds, "rows/s")


def _columns(rows: list[CustomerRow]) -> list[list[object]]:
    """Rows to column arrays, the shape ``unnest`` takes."""
    return [list(column) for column in zip(*rows, strict=True)]


@benchmark("ceiling.pg_upsert_rows_per_s")
async def pg_upsert_rows_per_s(ctx: Context) -> Figure:
    """Rows/s of ``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO UPDATE``, batches of 1,000.

    Half the rows already exist (every even row number is loaded beforehand, untimed), so every
    batch is half inserts, half updates, as when a CRM re-syncs its customers.
    """
    count = ctx.sized(tiny=10_000, full=200_000)
    existing = customer_rows(range(0, count, 2))
    batches = [
        _columns(customer_rows(range(start, min(start + UPSERT_BATCH, count)), generation=1))
        for start in range(0, count, UPSERT_BATCH)
    ]
    async with ctx.scratch_database() as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                f"CREATE TABLE customers ({CUSTOMER_COLUMN_DDL}, PRIMARY KEY (external_id))"
            )
            await conn.copy_records_to_table(
                "customers", records=existing, columns=list(CUSTOMER_COLUMNS)
            )
            # Fresh statistics, as a long-lived table would have.
            await conn.execute("VACUUM ANALYZE customers")
            statement = await conn.prepare(_UPSERT_SQL)
            with Stopwatch() as sw:
                for columns in batches:
                    await statement.fetch(*columns)
            total, updated = await conn.fetchrow(
                "SELECT count(*), count(*) FILTER (WHERE email LIKE '%.1@example.com')"
                " FROM customers"
            ) or (0, 0)
        finally:
            await conn.close()
    if total != count or updated != count:
        raise AssertionError(f"{total} rows / {updated} upserted, expected {count}")
    ctx.log(f"  upserted {count:,} rows ({len(existing):,} updates) in {sw.seconds:.2f} s")
    return Figure("ceiling.pg_upsert_rows_per_s", sw.rate(count), "rows/s")
