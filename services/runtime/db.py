"""PostgreSQL connection pool for a service, and the root of the data plane's error hierarchy.

Every service talks to its own database through one :class:`asyncpg.Pool` made by
:func:`create_pool`. The pool decodes ``json``/``jsonb`` columns to Python values and encodes
Python values to them, so store modules pass dicts and lists, never JSON strings.

Sharp edges:
    * A ``jsonb`` parameter is encoded with :func:`json.dumps`; passing an already-encoded JSON
      string stores a JSON *string*, not an object.
    * asyncpg caches prepared statements per connection; a migration that changes a table's
      shape under a running pool makes cached statements fail once with
      ``InvalidCachedStatementError`` (asyncpg retries that case itself outside transactions).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

__all__ = ["DBConnection", "DataPlaneError", "create_pool", "database_reachable", "fetch_scalar"]

log = logging.getLogger(__name__)

#: Either kind of connection asyncpg hands out: a plain one, or a pool's proxy
#: (``async with pool.acquire() as conn``). Store functions take this.
DBConnection: TypeAlias = asyncpg.Connection | PoolConnectionProxy


async def fetch_scalar(conn: DBConnection, query: str, *args: object) -> Any:
    """The first column of the first row, read the way PostgreSQL may run in parallel.

    asyncpg's ``fetchval`` and ``fetchrow`` ask for one row (an Execute message with a row
    limit), and PostgreSQL never starts parallel workers for such a portal: a plan with a
    Gather then runs on the leader alone. A count or an aggregate over many rows (a segment's
    size) reads its one row with this instead.
    """
    rows = await conn.fetch(query, *args)
    return rows[0][0] if rows else None


class DataPlaneError(Exception):
    """Root of the errors raised by the runtime's data plane (migrations, Kafka, outbox, inbox).

    These are infrastructure failures, not domain errors: they are never mapped to a gRPC status
    for a caller, they are logged and make the process (or the background task) fail.
    """


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Both JSON types decode to Python values; text format keeps it exact for jsonb.
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name,
            schema="pg_catalog",
            encoder=json.dumps,
            decoder=json.loads,
            format="text",
        )


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    """Open a connection pool to one service database.

    Args:
        dsn: A ``postgresql://`` URL.
        min_size: Connections opened up front and kept open.
        max_size: Upper bound of concurrently open connections.

    Returns:
        A started pool; close it with ``await pool.close()``.

    Raises:
        OSError | asyncpg.PostgresError: When the database cannot be reached at all; the pool
            opens ``min_size`` connections eagerly, so a wrong DSN fails here, not later.
    """
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
    )
    # create_pool's return type is Optional in the stubs; it only returns None when not awaited.
    assert pool is not None
    return pool


async def database_reachable(pool: asyncpg.Pool, timeout: float = 2.0) -> bool:  # noqa: ASYNC109
    """Whether a ``SELECT 1`` through the pool answers within ``timeout`` seconds.

    For readiness checks: never raises. A pool whose connections are all busy counts as
    unreachable once the timeout passes, which is what a readiness probe should report.
    """
    try:
        async with asyncio.timeout(timeout):
            return bool(await pool.fetchval("SELECT 1") == 1)
    except Exception as exc:  # a probe reports, it never raises
        log.warning("database not reachable: %r", exc)
        return False
