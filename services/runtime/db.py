"""PostgreSQL connection pool for a service, and the root of the data plane's error hierarchy.

Every service talks to its own database through one :class:`asyncpg.Pool` made by
:func:`create_pool`. The pool decodes ``json``/``jsonb`` columns to Python values and encodes
Python values to them, so store modules pass dicts and lists, never JSON strings.

A connection goes back to the pool without a round trip: asyncpg's default reset sends
``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` on every release, which cost as
much as the query of a simple RPC. Our pooled connections keep no session state (settings are
``SET LOCAL``, cursors live in transactions, an open transaction is still rolled back), except
where code takes a session advisory lock or LISTENs on one: it calls
:func:`hold_session_state`, and that connection gets the full reset when it is released.

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

__all__ = [
    "DBConnection",
    "DataPlaneError",
    "create_pool",
    "database_reachable",
    "fetch_scalar",
    "hold_session_state",
]

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


#: Server process ids of pooled connections that hold session state (see the module docstring).
#: Keyed by pid because the pool's reset sees the connection, callers its proxy; a pid reused by
#: a later backend would only cost that connection one full reset.
_HOLDING_SESSION_STATE: set[int] = set()


def hold_session_state(conn: DBConnection) -> None:
    """Mark a pooled connection that took session state (a session advisory lock, LISTEN):
    the pool resets it in full (``pg_advisory_unlock_all``, ``UNLISTEN *``, ...) on release,
    however the holder lets go of it. Call it before taking the state."""
    _HOLDING_SESSION_STATE.add(conn.get_server_pid())


async def _reset_connection(conn: asyncpg.Connection) -> None:
    # asyncpg has already rolled back an open transaction and dropped the listeners' callbacks.
    pid = conn.get_server_pid()
    if pid in _HOLDING_SESSION_STATE:
        _HOLDING_SESSION_STATE.discard(pid)
        # If this fails, asyncpg terminates the connection and the state ends with the session.
        await conn.execute(conn.get_reset_query())


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
        reset=_reset_connection,
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
