"""Providers' delivery reports applied to messages: DELIVERED, FAILED, BOUNCED, read receipts
and spam complaints, each a timeline entry and a ``delivery.receipts`` fact.

A report concerns a message the provider accepted (ledger state ``sent``). It moves the status
forward only: DELIVERED after SENT; FAILED or BOUNCED after SENT or DELIVERED (a message opened
or clicked stays so); a read receipt is an open (never moving a status back). A bounce of a dead
address (``token_invalid``) makes identity disable the subscription through the existing
receipt path. Providers repeat webhooks: each (message, status, reason) is recorded once, and its
receipt's ``event_id`` is stable, so consumers deduplicate too.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

import asyncpg
from tidings.delivery.v1 import message_pb2

from services.delivery.providers.base import DeliveryReport, ReportKind
from services.delivery.receipts import Fact, record_facts

__all__ = ["Applied", "apply_report", "find_by_provider_id"]

S = message_pb2
#: Report kind -> (message status, timeline reason).
_STATUS: dict[ReportKind, tuple[int, str]] = {
    ReportKind.DELIVERED: (S.MESSAGE_STATUS_DELIVERED, ""),
    ReportKind.FAILED: (S.MESSAGE_STATUS_FAILED, "UNDELIVERED"),
    ReportKind.BOUNCED: (S.MESSAGE_STATUS_BOUNCED, "BOUNCED"),
    ReportKind.READ: (S.MESSAGE_STATUS_OPENED, "READ"),
    ReportKind.COMPLAINED: (S.MESSAGE_STATUS_UNSUBSCRIBED, "COMPLAINT"),
}
#: The statuses each report may replace.
_REPLACES: dict[int, frozenset[int]] = {
    S.MESSAGE_STATUS_DELIVERED: frozenset({S.MESSAGE_STATUS_SENT}),
    S.MESSAGE_STATUS_FAILED: frozenset({S.MESSAGE_STATUS_SENT, S.MESSAGE_STATUS_DELIVERED}),
    S.MESSAGE_STATUS_BOUNCED: frozenset({S.MESSAGE_STATUS_SENT, S.MESSAGE_STATUS_DELIVERED}),
    S.MESSAGE_STATUS_OPENED: frozenset(
        {S.MESSAGE_STATUS_SENT, S.MESSAGE_STATUS_DELIVERED, S.MESSAGE_STATUS_BOUNCED}
    ),
    S.MESSAGE_STATUS_UNSUBSCRIBED: frozenset(
        {
            S.MESSAGE_STATUS_SENT,
            S.MESSAGE_STATUS_DELIVERED,
            S.MESSAGE_STATUS_OPENED,
            S.MESSAGE_STATUS_CLICKED,
        }
    ),
}


class Applied(StrEnum):
    """What became of a report."""

    RECORDED = "recorded"
    DUPLICATE = "duplicate"  #: the same status was reported before
    UNKNOWN = "unknown"  #: no such message of the app (or another channel's)
    NOT_SENT_YET = "not_sent_yet"  #: the provider answered faster than the worker recorded it


async def find_by_provider_id(
    pool: asyncpg.Pool, app_id: str, channel: str, provider_message_id: str
) -> uuid.UUID | None:
    """The message the provider knows by ``provider_message_id`` on ``channel``."""
    if not provider_message_id:
        return None
    found: uuid.UUID | None = await pool.fetchval(
        """
        SELECT message_id FROM messages
        WHERE app_id = $1 AND provider_message_id = $2 AND channel = $3
          AND channel IN ('email', 'whatsapp')
        """,
        app_id,
        provider_message_id,
        channel,
    )
    return found


async def apply_report(
    pool: asyncpg.Pool,
    app_id: str,
    message_id: uuid.UUID,
    channel: str,
    report: DeliveryReport,
    now: datetime,
) -> tuple[Applied, str]:
    """Record one report of a message sent on ``channel``; returns what happened and the
    message's subscription id (for a complaint's opt-out)."""
    status, reason = _STATUS[report.kind]
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            """
            SELECT user_id, status, state, subscription_id, channel, idempotency_key,
                   broadcast_id, journey_id, journey_node_id, provider_message_id
            FROM messages WHERE app_id = $1 AND message_id = $2 FOR UPDATE
            """,
            app_id,
            message_id,
        )
        if row is None or row["channel"] != channel:
            return Applied.UNKNOWN, ""
        if report.provider_message_id and row["provider_message_id"] not in (
            "",
            report.provider_message_id,
        ):
            return Applied.UNKNOWN, ""
        if row["state"] == "sending":
            return Applied.NOT_SENT_YET, row["subscription_id"]
        if row["state"] != "sent":
            return Applied.UNKNOWN, ""
        seen = await conn.fetchval(
            "SELECT 1 FROM message_events WHERE app_id = $1 AND message_id = $2 "
            "AND status = $3 AND reason = $4 LIMIT 1",
            app_id,
            message_id,
            status,
            reason,
        )
        if seen:
            return Applied.DUPLICATE, row["subscription_id"]
        if row["status"] in _REPLACES[status]:
            await conn.execute(
                "UPDATE messages SET status = $3, update_time = $4 "
                "WHERE app_id = $1 AND message_id = $2",
                app_id,
                message_id,
                status,
                now,
            )
        fact = Fact(
            app_id=app_id,
            message_id=message_id,
            user_id=row["user_id"],
            status=status,
            time=now,
            reason=reason,
            detail=report.detail,
            channel=row["channel"],
            subscription_id=row["subscription_id"],
            idempotency_key=row["idempotency_key"],
            broadcast_id=str(row["broadcast_id"] or ""),
            journey_id=row["journey_id"],
            journey_node_id=row["journey_node_id"],
            token_invalid=report.token_invalid,
            nth=f"report:{reason}",
        )
        await record_facts(conn, [fact])
    return Applied.RECORDED, row["subscription_id"]
