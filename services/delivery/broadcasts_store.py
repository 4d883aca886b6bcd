"""SQL of the ``broadcasts`` table: jobs, their fan-out cursor and their progress counts."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
from tidings.delivery.v1 import broadcast_pb2, message_pb2

from services.delivery.jobs import Job
from services.runtime.db import DBConnection

__all__ = [
    "STATES",
    "BroadcastDeltas",
    "BroadcastSpec",
    "apply_deltas",
    "broadcast_from_row",
    "load_broadcast_specs",
]

#: Stored state -> proto state.
STATES: dict[str, broadcast_pb2.Broadcast.State.ValueType] = {
    "fanning_out": broadcast_pb2.Broadcast.STATE_FANNING_OUT,
    "enqueued": broadcast_pb2.Broadcast.STATE_ENQUEUED,
    "failed": broadcast_pb2.Broadcast.STATE_FAILED,
    "cancelled": broadcast_pb2.Broadcast.STATE_CANCELLED,
}


@dataclass(frozen=True, slots=True)
class BroadcastSpec:
    """What a worker needs of a broadcast: its spec and whether it was cancelled."""

    spec: message_pb2.MessageSpec
    cancelled: bool


async def load_broadcast_specs(
    conn: DBConnection, broadcast_ids: Iterable[uuid.UUID]
) -> dict[tuple[str, uuid.UUID], BroadcastSpec]:
    """Specs of these broadcasts (of any app: ids are unique), by (app, broadcast)."""
    ids = sorted(set(broadcast_ids))
    if not ids:
        return {}
    rows = await conn.fetch(
        "SELECT app_id, broadcast_id, spec, state FROM broadcasts WHERE broadcast_id = ANY($1)",
        ids,
    )
    return {
        (row["app_id"], row["broadcast_id"]): BroadcastSpec(
            message_pb2.MessageSpec.FromString(row["spec"]), row["state"] == "cancelled"
        )
        for row in rows
    }


@dataclass
class BroadcastDeltas:
    """Progress counts to add to broadcasts, per message, applied in one statement."""

    _by_message: dict[uuid.UUID, tuple[str, uuid.UUID, int, int, int]] = field(default_factory=dict)

    def add(self, job: Job, *, sent: int = 0, failed: int = 0, deferred: int = 0) -> None:
        """Count one message's outcome (messages not of a broadcast are ignored)."""
        if job.broadcast_id is not None:
            self._by_message[job.message_id] = (
                job.app_id,
                job.broadcast_id,
                sent,
                failed,
                deferred,
            )

    def only(self, message_ids: set[uuid.UUID]) -> dict[tuple[str, uuid.UUID], list[int]]:
        """The totals per broadcast of the messages whose change really happened."""
        totals: dict[tuple[str, uuid.UUID], list[int]] = defaultdict(lambda: [0, 0, 0])
        for message_id, (app_id, broadcast_id, sent, failed, deferred) in self._by_message.items():
            if message_id in message_ids:
                total = totals[(app_id, broadcast_id)]
                total[0] += sent
                total[1] += failed
                total[2] += deferred
        return dict(totals)


async def apply_deltas(conn: DBConnection, totals: dict[tuple[str, uuid.UUID], list[int]]) -> None:
    """Add progress counts (sent, failed, deferred) to broadcasts; ordered to avoid deadlocks."""
    if not totals:
        return
    keys = sorted(totals)
    await conn.execute(
        """
        UPDATE broadcasts b SET sent = b.sent + d.sent, failed = b.failed + d.failed,
                                deferred = b.deferred + d.deferred
        FROM unnest($1::text[], $2::uuid[], $3::bigint[], $4::bigint[], $5::bigint[])
             AS d(app_id, broadcast_id, sent, failed, deferred)
        WHERE b.app_id = d.app_id AND b.broadcast_id = d.broadcast_id
        """,
        [k[0] for k in keys],
        [k[1] for k in keys],
        [totals[k][0] for k in keys],
        [totals[k][1] for k in keys],
        [totals[k][2] for k in keys],
    )


def broadcast_from_row(row: asyncpg.Record) -> broadcast_pb2.Broadcast:
    """The API form of a stored broadcast."""
    out = broadcast_pb2.Broadcast(
        broadcast_id=str(row["broadcast_id"]),
        display_name=row["display_name"],
        audience=broadcast_pb2.Audience.FromString(row["audience"]),
        spec=message_pb2.MessageSpec.FromString(row["spec"]),
        state=STATES[row["state"]],
        enqueued_count=row["enqueued"],
        sent_count=row["sent"],
        failed_count=row["failed"],
        deferred_count=max(0, row["deferred"]),
        error=row["error"],
    )
    out.create_time.FromDatetime(row["create_time"])
    out.update_time.FromDatetime(row["update_time"])
    enqueued_time: datetime | None = row["enqueued_time"]
    if enqueued_time is not None:
        out.enqueued_time.FromDatetime(enqueued_time)
    return out
