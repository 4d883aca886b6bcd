"""A worker's lease: proof, readable by every replica, that the worker claiming sends is alive.

A worker claims ledger rows (``sending``) before its provider calls and records the outcome
after them. A row still ``sending`` long after its claim either belongs to a dead worker (its
call's outcome is lost for good) or to a live one that is slow or paused (SIGSTOP, a VM pause)
and will record the outcome when it wakes. Only the first may be settled by the scheduler.

Each worker therefore holds a PostgreSQL session advisory lock on its own connection, under a
random key, and stamps that key on the rows it claims (``messages.claimed_by``). PostgreSQL
releases the lock the moment the worker's session ends — the process died, or its connection
did — so "the lock is gone" is "nobody will record this row's outcome". A worker whose lock
connection dropped takes a new key for its next claims; the rows of the old key count as its
predecessor's.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets

import asyncpg

__all__ = ["LIVE_LEASE", "Lease"]

#: SQL condition: the lease ``claimed_by`` (a column or parameter) is held by a live session of
#: this database. Advisory locks on one bigint key show in pg_locks as (classid, objid) =
#: (high, low 32 bits) with objsubid 1; keys are positive and below 2**62.
LIVE_LEASE = """EXISTS (
    SELECT 1 FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND ((l.classid::bigint << 32) | l.objid::bigint) = {claimed_by}
)"""


class Lease:
    """The advisory lock a worker holds while it lives (see the module docstring).

    Args:
        dsn: The delivery database.
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: asyncpg.Connection | None = None
        self._key = 0
        self._lock = asyncio.Lock()

    async def key(self) -> int:
        """The key of a lock this process holds right now (taken, or taken again, if needed)."""
        async with self._lock:
            conn = self._conn
            if conn is None or conn.is_closed():
                conn = await asyncpg.connect(self._dsn)
                while True:
                    key = secrets.randbelow((1 << 62) - 1) + 1
                    if await conn.fetchval("SELECT pg_try_advisory_lock($1::bigint)", key):
                        break
                self._conn, self._key = conn, key
            return self._key

    async def release(self) -> None:
        """Drop the lock now, without waiting for the server (it may be what failed): the rows
        claimed under it become the scheduler's; the next claim takes a new key."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def close(self) -> None:
        """Release the lock (its rows then count as a dead worker's)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
