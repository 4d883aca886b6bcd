"""Lining up a race in a test: waiting until another session waits for a lock ours holds."""

from __future__ import annotations

import asyncpg

from tests.polling import eventually

__all__ = ["blocked_by", "wait_blocked_by"]


async def blocked_by(watcher: asyncpg.Connection, pid: int) -> list[int]:
    """The sessions waiting for a lock that session ``pid`` holds."""
    rows = await watcher.fetch(
        "SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", pid
    )
    return [int(row["pid"]) for row in rows]


async def wait_blocked_by(
    watcher: asyncpg.Connection, holder: asyncpg.Connection, what: str
) -> list[int]:
    """Wait until some session waits for a lock ``holder`` holds; the waiting sessions."""
    pid = int(await holder.fetchval("SELECT pg_backend_pid()"))
    return await eventually(lambda: blocked_by(watcher, pid), what=what)
