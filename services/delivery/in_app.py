"""In-app messages waiting for a device: what an SDK fetches for its own subscription.

An in-app message is claimed and "sent" like any other (the send ledger row, policy, receipts),
with its rendered content stored on the row and the user's most recently active device as its
subscription. It waits for that device until it is displayed, clicked or dismissed (reported
with ReportEngagement) or its TTL ends.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg
from tidings.delivery.v1 import delivery_service_pb2, message_pb2, template_pb2

from services.delivery.validation import parse_uuid
from services.runtime import paging
from services.runtime.errors import FieldViolations

__all__ = ["list_in_app"]

DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 50
#: Statuses of a message still to show (a late delivery report does not hide it).
_WAITING = [message_pb2.MESSAGE_STATUS_SENT, message_pb2.MESSAGE_STATUS_DELIVERED]


async def list_in_app(
    pool: asyncpg.Pool,
    app_id: str,
    request: delivery_service_pb2.ListInAppMessagesRequest,
    now: datetime,
) -> delivery_service_pb2.ListInAppMessagesResponse:
    """The in-app messages waiting for ``request.subscription_id``, oldest first.

    Raises:
        InvalidArgument: The subscription id is not a UUID, or a bad page size.
    """
    violations = FieldViolations()
    if parse_uuid(request.subscription_id) is None:
        violations.add(
            "subscription_id", "the subscription id (a UUID) is required", reason="REQUIRED"
        )
    violations.raise_if_any()
    limit = paging.page_size(request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
    rows = await pool.fetch(
        """
        SELECT message_id, content, template_id, update_time, expire_at FROM messages
        WHERE app_id = $1 AND subscription_id = $2 AND channel = 'in_app' AND state = 'sent'
          AND status = ANY($3::smallint[]) AND (expire_at IS NULL OR expire_at > $4)
        ORDER BY create_time, message_id
        LIMIT $5
        """,
        app_id,
        request.subscription_id,
        _WAITING,
        now,
        limit,
    )
    response = delivery_service_pb2.ListInAppMessagesResponse()
    for row in rows:
        message = response.messages.add(
            message_id=str(row["message_id"]),
            template_id=row["template_id"],
            content=template_pb2.InAppContent.FromString(row["content"] or b""),
        )
        message.send_time.FromDatetime(row["update_time"])
        if row["expire_at"] is not None:
            message.expire_time.FromDatetime(row["expire_at"])
    return response
