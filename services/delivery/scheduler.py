"""The scheduler: puts due messages back on ``delivery.requests``, and settles stuck sends.

* **Due messages.** A deferred message (send-at, quiet hours, frequency cap) or one waiting for
  a retry has ``due_at``. Every ``scheduler_interval_seconds`` the scheduler claims due rows
  with ``FOR UPDATE SKIP LOCKED`` (so any number of replicas share the work), moves them back
  to ``queued`` with ``dispatch + 1`` and puts their record, carrying that dispatch, in the
  outbox: one transaction, so each wake-up is published exactly once and older records of the
  message (with an older dispatch) do nothing.
* **Stuck sends.** A ``sending`` row older than ``stuck_after_seconds`` (5 min) belongs to a
  worker that died
  during the provider call: whether the provider got the call is unknown. It is never retried
  (that could send twice); it is marked FAILED with reason OUTCOME_UNKNOWN.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime, timedelta

from tidings.delivery.v1 import message_pb2
from tidings.events.v1.send_request_pb2 import SendRequest

from services.delivery.broadcasts_store import apply_deltas
from services.delivery.jobs import record_key
from services.delivery.receipts import Fact, record_facts
from services.runtime import outbox
from services.runtime.app import ServiceContext
from services.runtime.kafka import DELIVERY_REQUESTS

__all__ = ["STUCK_AFTER", "requeue_due", "run_scheduler", "settle_stuck"]

#: A provider call takes at most ~30 s (adapter timeouts); a claim this old lost its worker.
STUCK_AFTER = timedelta(minutes=5)
_BATCH = 500

_REQUEUE = """
WITH due AS (
    SELECT app_id, message_id, request
    FROM messages
    WHERE due_at <= $1 AND state IN ('deferred', 'retry_wait')
    ORDER BY due_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE messages m SET state = 'queued', status = $3, dispatch = m.dispatch + 1, due_at = NULL,
                      request = NULL, update_time = $1
FROM due
WHERE m.app_id = due.app_id AND m.message_id = due.message_id
RETURNING m.app_id, m.message_id, m.dispatch, m.broadcast_id, due.request
"""


async def requeue_due(ctx: ServiceContext, now: datetime, limit: int = _BATCH) -> int:
    """Put up to ``limit`` due messages back on the topic; returns how many."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(_REQUEUE, now, limit, message_pb2.MESSAGE_STATUS_QUEUED)
        records = []
        waiting: Counter[tuple[str, object]] = Counter()
        for row in rows:
            record = SendRequest.FromString(row["request"] or b"")
            record.app_id = row["app_id"]
            record.message_id = str(row["message_id"])
            record.dispatch = row["dispatch"]
            records.append((record_key(record), record))
            if row["broadcast_id"] is not None:
                waiting[(row["app_id"], row["broadcast_id"])] -= 1
        await outbox.enqueue_many(conn, DELIVERY_REQUESTS, records)
        await apply_deltas(conn, {key: [0, 0, count] for key, count in waiting.items()})  # type: ignore[misc]
    return len(rows)


_STUCK = """
WITH stuck AS (
    SELECT app_id, message_id FROM messages
    WHERE state = 'sending' AND update_time < $1
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE messages m SET state = 'failed', status = $3, sent_at = NULL, update_time = $4
FROM stuck
WHERE m.app_id = stuck.app_id AND m.message_id = stuck.message_id
RETURNING m.app_id, m.message_id, m.user_id, m.channel, m.subscription_id, m.idempotency_key,
          m.broadcast_id, m.attempts, m.journey_id, m.journey_node_id
"""


async def settle_stuck(
    ctx: ServiceContext, now: datetime, stuck_after: timedelta = STUCK_AFTER, limit: int = _BATCH
) -> int:
    """Fail sends whose worker died mid-call (OUTCOME_UNKNOWN); returns how many."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            _STUCK, now - stuck_after, limit, message_pb2.MESSAGE_STATUS_FAILED, now
        )
        facts = [
            Fact(
                app_id=row["app_id"],
                message_id=row["message_id"],
                user_id=row["user_id"],
                status=message_pb2.MESSAGE_STATUS_FAILED,
                time=now,
                reason="OUTCOME_UNKNOWN",
                detail="the worker stopped during the provider call; not retried, so that the "
                "message is never sent twice",
                channel=row["channel"],
                subscription_id=row["subscription_id"],
                idempotency_key=row["idempotency_key"],
                broadcast_id=str(row["broadcast_id"] or ""),
                journey_id=row["journey_id"],
                journey_node_id=row["journey_node_id"],
                nth=f"u{row['attempts']}",
            )
            for row in rows
        ]
        await record_facts(conn, facts)
        failed: Counter[tuple[str, object]] = Counter(
            (row["app_id"], row["broadcast_id"]) for row in rows if row["broadcast_id"]
        )
        await apply_deltas(conn, {key: [0, count, 0] for key, count in failed.items()})  # type: ignore[misc]
    return len(rows)


async def run_scheduler(ctx: ServiceContext) -> None:
    """Background task: requeue due messages and settle stuck sends, forever."""
    interval = float(getattr(ctx.settings, "scheduler_interval_seconds", 1.0))
    stuck_after = timedelta(
        seconds=float(getattr(ctx.settings, "stuck_after_seconds", STUCK_AFTER.total_seconds()))
    )
    while True:
        now = ctx.clock()
        moved = await requeue_due(ctx, now)
        settled = await settle_stuck(ctx, now, stuck_after)
        if moved:
            ctx.log.info("requeued %d due message(s)", moved)
        if settled:
            ctx.log.warning("settled %d send(s) whose worker died mid-call", settled)
        if moved < _BATCH:
            await asyncio.sleep(interval)
