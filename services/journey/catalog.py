"""The engine's view of the journeys: definitions by version (immutable once activated, so
cached for good) and the live journeys by app, refreshed every second."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import asyncpg
from tidings.journey.v1 import journey_pb2 as jpb

from services.journey import journeys_store

__all__ = ["Catalog", "Live"]

_REFRESH_SECONDS = 1.0


@dataclass(frozen=True)
class Live:
    """An active or paused journey with the definition new entries go to."""

    app_id: str
    journey_id: uuid.UUID
    state: str
    version: int
    definition: jpb.JourneyDefinition

    @property
    def entry_kind(self) -> str:
        """``all_contacts``, ``customer_list``, ``segment``, ``event`` or ``birthday``."""
        return self.definition.entry.WhichOneof("kind") or ""


class Catalog:
    """Definitions and live journeys, cached.

    Args:
        pool: The journey database.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._definitions: dict[tuple[str, uuid.UUID, int], jpb.JourneyDefinition] = {}
        self._live: dict[tuple[str, uuid.UUID], Live] = {}
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()

    async def definition(
        self, app_id: str, journey_id: uuid.UUID, version: int
    ) -> jpb.JourneyDefinition:
        """One version's definition (an empty one if it no longer exists)."""
        key = (app_id, journey_id, version)
        found = self._definitions.get(key)
        if found is None:
            async with self._pool.acquire() as conn:
                data = await journeys_store.load_definition(conn, app_id, journey_id, version)
            found = jpb.JourneyDefinition.FromString(data or b"")
            if data is not None:
                self._definitions[key] = found
        return found

    async def live(self) -> dict[tuple[str, uuid.UUID], Live]:
        """Active and paused journeys by (app, journey), at most a second old."""
        if time.monotonic() - self._loaded_at < _REFRESH_SECONDS:
            return self._live
        async with self._lock:
            if time.monotonic() - self._loaded_at < _REFRESH_SECONDS:
                return self._live
            async with self._pool.acquire() as conn:
                rows = await journeys_store.live_journeys(conn)
            live = {}
            for row in rows:
                definition = await self.definition(row.app_id, row.journey_id, row.active_version)
                live[(row.app_id, row.journey_id)] = Live(
                    row.app_id, row.journey_id, row.state, row.active_version, definition
                )
            self._live = live
            self._loaded_at = time.monotonic()
        return self._live

    def invalidate(self) -> None:
        """Read the live journeys again on next use (after a lifecycle change here)."""
        self._loaded_at = 0.0
