"""The scheduler: puts due messages back on ``delivery.requests``, and settles stuck sends.

* **Due messages.** A deferred message (send-at, quiet hours, frequency cap) or one waiting for
  a retry has ``due_at``. Every ``scheduler_interval_seconds`` the scheduler claims due rows
  with ``FOR UPDATE SKIP LOCKED`` (so any number of replicas share the work), moves them back
  to ``queued`` with ``dispatch + 1`` and puts their record, carrying that dispatch, in the
  outbox: one transaction, so each wake-up is published exactly once and older records of the
  message (with an older dispatch) do nothing.
* **Stuck sends.** A ``sending`` row older than ``stuck_after_seconds`` (5 min) whose worker's
  lease is gone (:mod:`services.delivery.leases`: the worker died; a slow or paused one still
  holds it and will record the outcome) belongs to a worker that died during the provider
  call: whether the provider got the call is unknown
  (workers claim only the calls they start at once, so the call was in flight). On a channel
  whose receiver turns a repeat of the key into one message (webhooks: ``Idempotency-Key``;
  APNs: ``apns-collapse-id``) it is sent again with the same key, as a retry (timeline:
  DEFERRED, OUTCOME_UNKNOWN); on any other channel a repeat would be a second message, so it
  is marked FAILED with reason OUTCOME_UNKNOWN (at most once).
* **Lost requeued records.** A requeued message keeps its record while ``queued``; one still
  not claimed ``stuck_after_seconds`` after its requeue lost its record on the way to the
  workers (a relay or consumer hiccup around a broker restart) and gets the next dispatch and
  a new record. The old record, if it still arrives, is stale: only one can ever be claimed.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime, timedelta

import asyncpg
from tidings.delivery.v1 import message_pb2
from tidings.events.v1.send_request_pb2 import SendRequest

from services.delivery.broadcasts_store import apply_deltas
from services.delivery.jobs import record_key
from services.delivery.leases import LIVE_LEASE
from services.delivery.providers.base import RESEND_SAFE
from services.delivery.receipts import Fact, record_facts
from services.runtime import outbox
from services.runtime.app import ServiceContext
from services.runtime.db import DBConnection
from services.runtime.kafka import DELIVERY_REQUESTS

__all__ = ["STUCK_AFTER", "redispatch_lost", "requeue_due", "run_scheduler", "settle_stuck"]

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
                      update_time = $1
FROM due
WHERE m.app_id = due.app_id AND m.message_id = due.message_id
RETURNING m.app_id, m.message_id, m.dispatch, m.broadcast_id, due.request
"""


async def requeue_due(ctx: ServiceContext, now: datetime, limit: int = _BATCH) -> int:
    """Put up to ``limit`` due messages back on the topic; returns how many."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(_REQUEUE, now, limit, message_pb2.MESSAGE_STATUS_QUEUED)
        await _publish(conn, rows)
        waiting: Counter[tuple[str, object]] = Counter()
        for row in rows:
            if row["broadcast_id"] is not None:
                waiting[(row["app_id"], row["broadcast_id"])] -= 1
        await apply_deltas(conn, {key: [0, 0, count] for key, count in waiting.items()})  # type: ignore[misc]
    return len(rows)


_REDISPATCH = """
WITH lost AS (
    SELECT app_id, message_id FROM messages
    WHERE state = 'queued' AND request IS NOT NULL AND update_time < $1
    ORDER BY update_time
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE messages m SET dispatch = m.dispatch + 1, update_time = $3
FROM lost
WHERE m.app_id = lost.app_id AND m.message_id = lost.message_id
RETURNING m.app_id, m.message_id, m.dispatch, m.broadcast_id, m.request
"""


async def redispatch_lost(
    ctx: ServiceContext, now: datetime, older_than: timedelta, limit: int = _BATCH
) -> int:
    """Publish again the records of requeued messages that no worker claimed for
    ``older_than``; returns how many.

    A requeued message is ``queued`` only until a worker claims its dispatch, which takes
    seconds. One still queued long after lost its record somewhere between the outbox and a
    worker. It gets the next dispatch and a new record: the old record, should it still
    arrive, is stale, so at most one of the two is ever acted on (never a second call).
    """
    async with ctx.pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(_REDISPATCH, now - older_than, limit, now)
        await _publish(conn, rows)
    return len(rows)


async def _publish(conn: DBConnection, rows: list[asyncpg.Record]) -> None:
    """Put the records of requeued rows in the outbox, each carrying the row's dispatch."""
    records = []
    for row in rows:
        record = SendRequest.FromString(row["request"] or b"")
        record.app_id = row["app_id"]
        record.message_id = str(row["message_id"])
        record.dispatch = row["dispatch"]
        records.append((record_key(record), record))
    await outbox.enqueue_many(conn, DELIVERY_REQUESTS, records)


_STUCK = f"""
WITH stuck AS (
    SELECT app_id, message_id FROM messages
    WHERE state = 'sending' AND update_time < $1
      AND (claimed_by IS NULL OR NOT {LIVE_LEASE.format(claimed_by="claimed_by")})
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), settled AS (
    SELECT m.app_id, m.message_id,
           m.channel = ANY($5::text[]) AND m.request IS NOT NULL AND m.attempts < $6 AS resend
    FROM messages m JOIN stuck USING (app_id, message_id)
)
UPDATE messages m SET
    state = CASE WHEN s.resend THEN 'retry_wait' ELSE 'failed' END,
    status = CASE WHEN s.resend THEN $7::smallint ELSE $3::smallint END,
    due_at = CASE WHEN s.resend THEN $4::timestamptz END,
    request = CASE WHEN s.resend THEN m.request END,
    sent_at = NULL, update_time = $4
FROM settled s
WHERE m.app_id = s.app_id AND m.message_id = s.message_id
RETURNING m.app_id, m.message_id, m.user_id, m.channel, m.subscription_id, m.idempotency_key,
          m.broadcast_id, m.attempts, m.journey_id, m.journey_node_id, s.resend
"""
_RESENT = (
    "the worker stopped during the provider call: sent again with the same idempotency key, "
    "which this channel's receiver turns into one message"
)
_NOT_RESENT = (
    "the worker stopped during the provider call: not sent again, so that the message is "
    "never delivered twice (this channel's provider would deliver a repeat)"
)


async def settle_stuck(
    ctx: ServiceContext,
    now: datetime,
    stuck_after: timedelta = STUCK_AFTER,
    limit: int = _BATCH,
    max_attempts: int = 5,
) -> int:
    """Settle sends whose worker died mid-call (OUTCOME_UNKNOWN); returns how many.

    On a resend-safe channel (:data:`~services.delivery.providers.base.RESEND_SAFE`) with
    attempts left, the send waits for a retry (the requeue publishes it again, same key);
    elsewhere it fails.
    """
    async with ctx.pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            _STUCK,
            now - stuck_after,
            limit,
            message_pb2.MESSAGE_STATUS_FAILED,
            now,
            sorted(channel.value for channel in RESEND_SAFE),
            max_attempts,
            message_pb2.MESSAGE_STATUS_DEFERRED,
        )
        facts = [
            Fact(
                app_id=row["app_id"],
                message_id=row["message_id"],
                user_id=row["user_id"],
                status=message_pb2.MESSAGE_STATUS_DEFERRED
                if row["resend"]
                else message_pb2.MESSAGE_STATUS_FAILED,
                time=now,
                reason="OUTCOME_UNKNOWN",
                detail=_RESENT if row["resend"] else _NOT_RESENT,
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
        deltas: dict[tuple[str, object], list[int]] = {}
        for row in rows:
            if row["broadcast_id"]:
                counts = deltas.setdefault((row["app_id"], row["broadcast_id"]), [0, 0, 0])
                counts[2 if row["resend"] else 1] += 1
        await apply_deltas(conn, deltas)  # type: ignore[arg-type]
    return len(rows)


async def run_scheduler(ctx: ServiceContext) -> None:
    """Background task: requeue due messages and settle stuck sends, forever."""
    interval = float(getattr(ctx.settings, "scheduler_interval_seconds", 1.0))
    stuck_after = timedelta(
        seconds=float(getattr(ctx.settings, "stuck_after_seconds", STUCK_AFTER.total_seconds()))
    )
    max_attempts = int(getattr(ctx.settings, "max_attempts", 5))
    while True:
        now = ctx.clock()
        moved = await requeue_due(ctx, now)
        settled = await settle_stuck(ctx, now, stuck_after, max_attempts=max_attempts)
        lost = await redispatch_lost(ctx, now, stuck_after)
        if lost:
            ctx.log.warning("published again %d requeued message(s) nobody claimed", lost)
        if moved:
            ctx.log.info("requeued %d due message(s)", moved)
        if settled:
            ctx.log.warning("settled %d send(s) whose worker died mid-call", settled)
        if moved < _BATCH:
            await asyncio.sleep(interval)
