"""Consumer-side deduplication: each consumer applies an event at most once.

Kafka delivers at least once (a crash between a handler's commit and the offset commit
redelivers the batch). A consumer claims the batch's event ids in the transaction of its effect,
and applies only the ids it claimed::

    async def handle(records: Sequence[Record[DeliveryReceipt]]) -> None:
        async with pool.acquire() as conn, conn.transaction():
            fresh = await claim_new(conn, "journey.receipts", [r.value.event_id for r in records])
            await store.apply_receipts(conn, [r.value for r in records
                                              if r.value.event_id in fresh])

If the transaction rolls back, the claims roll back with it, so the redelivered records are
applied then. Two consumers claiming the same id at once: the second waits for the first's
transaction and gets the id only if that one rolled back.

Sharp edges:
    * The consumer name is the dedup scope: two consumers with different effects on the same
      events need different names; renaming a consumer makes it re-apply redelivered events.
    * :func:`prune` forgets old claims; an event redelivered after its claim was pruned is
      applied again, so keep claims longer than records can be redelivered (topic retention).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from services.runtime.db import DBConnection

__all__ = ["claim_new", "prune"]

# Sorted so that two transactions claiming overlapping sets lock rows in the same order and
# cannot deadlock; DISTINCT so that an id twice in one batch is claimed (and applied) once.
_CLAIM = """
INSERT INTO inbox (consumer, event_id)
SELECT $1, event_id
FROM (SELECT DISTINCT unnest($2::text[]) AS event_id) AS ids
ORDER BY event_id
ON CONFLICT DO NOTHING
RETURNING event_id
"""

_PRUNE = "DELETE FROM inbox WHERE consumer = $1 AND processed_at < now() - $2::interval"


async def claim_new(conn: DBConnection, consumer: str, event_ids: Sequence[str]) -> set[str]:
    """Claim ``event_ids`` for ``consumer``; returns the ids not claimed before.

    Call it inside the transaction that applies the events (one statement per batch).

    Args:
        conn: Connection, inside the effect's transaction.
        consumer: Dedup scope, e.g. ``"journey.receipts"``.
        event_ids: Ids of the events about to be applied; duplicates are allowed.

    Returns:
        The ids to apply now; the others were already applied (or are being applied by a
        transaction that commits).
    """
    if not event_ids:
        return set()
    rows = await conn.fetch(_CLAIM, consumer, list(event_ids))
    return {row["event_id"] for row in rows}


async def prune(conn: DBConnection, consumer: str, older_than: timedelta) -> int:
    """Forget ``consumer``'s claims older than ``older_than``; returns how many were deleted."""
    result = await conn.execute(_PRUNE, consumer, older_than)
    return int(result.split()[-1])
