"""Messages as the API shows them (Get, List per user) and engagement (opens, clicks,
dismissals, unsubscribes) from SDKs and the tracking endpoint.

An engagement adds a timeline entry and a ``delivery.receipts`` fact (journeys wait on clicks);
the message's status becomes the engagement unless it is already further along (a click after
an open stays CLICKED; a second open adds an entry but keeps the status). Engagement is
recorded only for messages that were sent.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import asyncpg
from google.protobuf import json_format
from tidings.delivery.v1 import delivery_service_pb2, message_pb2

from services.delivery import channels
from services.delivery.receipts import Fact, record_facts
from services.delivery.validation import parse_uuid, require_uuid
from services.runtime import paging
from services.runtime.errors import FieldViolations, NotFound
from services.runtime.request_values import to_datetime

__all__ = ["engage", "get_message", "list_messages", "message_not_found"]

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
S = message_pb2
#: How far "along" each status is: engagement never moves a message back.
#: Engagements a message has once: repeats are answered, not recorded again.
_ONCE = frozenset({S.MESSAGE_STATUS_UNSUBSCRIBED})

_RANK: dict[int, int] = {
    S.MESSAGE_STATUS_QUEUED: 0,
    S.MESSAGE_STATUS_DEFERRED: 1,
    S.MESSAGE_STATUS_FAILED: 2,
    S.MESSAGE_STATUS_SENT: 3,
    S.MESSAGE_STATUS_DELIVERED: 4,
    S.MESSAGE_STATUS_BOUNCED: 5,
    S.MESSAGE_STATUS_OPENED: 6,
    S.MESSAGE_STATUS_DISMISSED: 7,
    S.MESSAGE_STATUS_CLICKED: 8,
    S.MESSAGE_STATUS_UNSUBSCRIBED: 9,
}
_SENT_STATES = ("sent",)
_MAX_ENGAGEMENT_AGE = timedelta(days=30)


def message_not_found(message_id: str) -> NotFound:
    """The error for a message the app does not have."""
    return NotFound(
        f"message {message_id!r} not found",
        reason="MESSAGE_NOT_FOUND",
        metadata={"message_id": message_id},
    )


_COLUMNS = """
m.app_id, m.message_id, m.user_id, m.channel, m.subscription_id, m.template_id,
m.template_version, m.broadcast_id, m.idempotency_key, m.status, m.attempts,
m.provider_message_id, m.create_time, m.update_time, m.expire_at, m.due_at
"""


def _message(row: asyncpg.Record, events: list[asyncpg.Record]) -> message_pb2.Message:
    out = message_pb2.Message(
        message_id=str(row["message_id"]),
        user_id=row["user_id"],
        channel=channels.channel_proto(row["channel"]),  # type: ignore[arg-type]
        subscription_id=row["subscription_id"],
        template_id=row["template_id"],
        template_version=row["template_version"],
        broadcast_id=str(row["broadcast_id"] or ""),
        idempotency_key=row["idempotency_key"],
        status=row["status"],
        attempts=row["attempts"],
        provider_message_id=row["provider_message_id"],
    )
    out.create_time.FromDatetime(row["create_time"])
    out.update_time.FromDatetime(row["update_time"])
    if row["expire_at"] is not None:
        out.expire_time.FromDatetime(row["expire_at"])
    if row["due_at"] is not None:
        out.next_attempt_time.FromDatetime(row["due_at"])
    # Every message was queued when created; that entry is not stored, it is the row.
    first = out.timeline.add(status=S.MESSAGE_STATUS_QUEUED)
    first.time.FromDatetime(row["create_time"])
    for event in events:
        change = out.timeline.add(status=event["status"], reason=event["reason"])
        change.detail = event["detail"]
        change.time.FromDatetime(event["time"])
    return out


async def _events(
    conn: asyncpg.Pool, app_id: str, message_ids: list[uuid.UUID]
) -> dict[uuid.UUID, list[asyncpg.Record]]:
    rows = await conn.fetch(
        """
        SELECT message_id, status, reason, detail, time FROM message_events
        WHERE app_id = $1 AND message_id = ANY($2::uuid[])
        ORDER BY message_id, time, id
        """,
        app_id,
        message_ids,
    )
    found: dict[uuid.UUID, list[asyncpg.Record]] = {}
    for row in rows:
        found.setdefault(row["message_id"], []).append(row)
    return found


async def get_message(pool: asyncpg.Pool, app_id: str, message_id: str) -> message_pb2.Message:
    """One message with its timeline.

    Raises:
        InvalidArgument: Not a message id.
        NotFound: The app has no such message.
    """
    parsed = require_uuid("message_id", message_id, "message id")
    row = await pool.fetchrow(
        f"SELECT {_COLUMNS} FROM messages m WHERE m.app_id = $1 AND m.message_id = $2",
        app_id,
        parsed,
    )
    if row is None:
        raise message_not_found(message_id)
    events = await _events(pool, app_id, [parsed])
    return _message(row, events.get(parsed, []))


async def list_messages(
    pool: asyncpg.Pool, app_id: str, user_id: str, *, page_size: int, page_token: str
) -> delivery_service_pb2.ListMessagesResponse:
    """A user's messages, newest first, with timelines."""
    limit = paging.page_size(page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
    list_name = f"messages:{user_id}"
    after_time: datetime | None = None
    after_id: uuid.UUID | None = None
    if page_token:
        position = paging.decode_page_token(list_name, page_token)
        try:
            after_time = datetime.fromisoformat(position["t"])
            after_id = uuid.UUID(position["i"])
        except (KeyError, ValueError):
            raise paging.bad_page_token() from None
    rows = await pool.fetch(
        f"""
        SELECT {_COLUMNS} FROM messages m
        WHERE m.app_id = $1 AND m.user_id = $2
          AND ($3::timestamptz IS NULL
               OR (m.create_time, m.message_id) < ($3::timestamptz, $4::uuid))
        ORDER BY m.create_time DESC, m.message_id DESC
        LIMIT $5
        """,
        app_id,
        user_id,
        after_time,
        after_id,
        limit + 1,
    )
    page = rows[:limit]
    events = await _events(pool, app_id, [row["message_id"] for row in page])
    response = delivery_service_pb2.ListMessagesResponse(
        messages=[_message(row, events.get(row["message_id"], [])) for row in page]
    )
    if len(rows) > limit:
        last = page[-1]
        response.next_page_token = paging.encode_page_token(
            list_name, {"t": last["create_time"].isoformat(), "i": str(last["message_id"])}
        )
    return response


async def engage(
    pool: asyncpg.Pool,
    app_id: str,
    message_id: uuid.UUID,
    status: int,
    at: datetime,
    *,
    subscription_id: str | None = None,
    url: str = "",
    detail: str = "",
) -> int:
    """Record an engagement with a sent message; returns the message's status after it.

    Args:
        subscription_id: When given (SDK reports), the message must have gone to it.

    Raises:
        NotFound: No such sent message of the app (to that subscription).
    """
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            """
            SELECT user_id, status, state, subscription_id, channel, idempotency_key,
                   broadcast_id, journey_id, journey_node_id
            FROM messages WHERE app_id = $1 AND message_id = $2 FOR UPDATE
            """,
            app_id,
            message_id,
        )
        if (
            row is None
            or row["state"] not in _SENT_STATES
            or (subscription_id is not None and row["subscription_id"] != subscription_id)
        ):
            raise message_not_found(str(message_id))
        current = row["status"]
        new = status if _RANK.get(status, 0) > _RANK.get(current, 0) else current
        count = await conn.fetchval(
            "SELECT count(*) FROM message_events WHERE app_id = $1 AND message_id = $2 "
            "AND status = $3",
            app_id,
            message_id,
            status,
        )
        if count and status in _ONCE:
            return int(current)  # a repeat (a mail client's POST, then the reader's click)
        await conn.execute(
            "UPDATE messages SET status = $3, update_time = $4 WHERE app_id = $1 "
            "AND message_id = $2",
            app_id,
            message_id,
            new,
            at,
        )
        await record_facts(
            conn,
            [
                Fact(
                    app_id=app_id,
                    message_id=message_id,
                    user_id=row["user_id"],
                    status=status,
                    time=at,
                    detail=detail or url,
                    channel=row["channel"],
                    subscription_id=row["subscription_id"],
                    idempotency_key=row["idempotency_key"],
                    broadcast_id=str(row["broadcast_id"] or ""),
                    journey_id=row["journey_id"],
                    journey_node_id=row["journey_node_id"],
                    url=url,
                    nth=str(count),
                )
            ],
        )
    return int(new)


_KINDS = {
    delivery_service_pb2.ENGAGEMENT_KIND_OPENED: S.MESSAGE_STATUS_OPENED,
    delivery_service_pb2.ENGAGEMENT_KIND_CLICKED: S.MESSAGE_STATUS_CLICKED,
    delivery_service_pb2.ENGAGEMENT_KIND_DISPLAYED: S.MESSAGE_STATUS_OPENED,
    delivery_service_pb2.ENGAGEMENT_KIND_DISMISSED: S.MESSAGE_STATUS_DISMISSED,
}


def check_engagement(
    request: delivery_service_pb2.ReportEngagementRequest, now: datetime
) -> tuple[uuid.UUID, int, datetime]:
    """Validate a ReportEngagement request; returns (message id, status, time).

    Raises:
        InvalidArgument: Naming each bad field.
    """
    violations = FieldViolations()
    message_id = parse_uuid(request.message_id)
    if message_id is None:
        violations.add("message_id", "a message id (a UUID) is required", reason="REQUIRED")
    if parse_uuid(request.subscription_id) is None:
        violations.add(
            "subscription_id", "the subscription id (a UUID) is required", reason="REQUIRED"
        )
    status = _KINDS.get(request.kind)
    if status is None:
        violations.add("kind", "OPENED, CLICKED, DISPLAYED or DISMISSED", reason="REQUIRED")
    if request.kind == delivery_service_pb2.ENGAGEMENT_KIND_CLICKED and len(request.url) > 2000:
        violations.add("url", "at most 2,000 characters")
    at = now
    if request.HasField("occur_time"):
        at = to_datetime(request.occur_time, "occur_time")
        if at > now + timedelta(minutes=5) or at < now - _MAX_ENGAGEMENT_AGE:
            violations.add("occur_time", "within the last 30 days and not in the future")
    if request.HasField("properties") and len(json_format.MessageToJson(request.properties)) > 8192:
        violations.add("properties", "at most 8 KiB")
    violations.raise_if_any()
    assert message_id is not None
    assert status is not None
    return message_id, status, at
