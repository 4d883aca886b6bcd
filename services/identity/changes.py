"""The change feed: facts about users, written to the outbox in the transaction that made them.

Every write that changes a profile or a subscription calls :func:`publish` with the changes it
made, in its own transaction: one statement per call however many users a batch touched, so
batch writes never pay an outbox round trip per user. The relay puts them on
``identity.changes`` keyed by user id.

The same call queues the users concerned for segment re-evaluation (one more statement), so a
change that can move a user into or out of a segment is never committed without its mark.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp
from tidings.events.v1.identity_change_pb2 import IdentityChange

from services.identity import segments_store
from services.runtime.db import DBConnection
from services.runtime.kafka import IDENTITY_CHANGES
from services.runtime.outbox import enqueue_many

__all__ = ["Kind", "change", "publish"]

Kind = IdentityChange.Kind


def change(
    kind: IdentityChange.Kind.ValueType,
    *,
    app_id: str,
    user_id: uuid.UUID | str,
    at: datetime,
    external_id: str | None = None,
    changed_fields: Iterable[str] = (),
    merged_user_id: uuid.UUID | str | None = None,
    subscription_id: uuid.UUID | str | None = None,
    subscription_type: str = "",
    subscription_reachable: bool = False,
) -> IdentityChange:
    """One change fact, with a fresh event id."""
    occurred_at = Timestamp()
    occurred_at.FromDatetime(at)
    return IdentityChange(
        event_id=str(uuid.uuid4()),
        app_id=app_id,
        user_id=str(user_id),
        kind=kind,
        occurred_at=occurred_at,
        external_id=external_id or "",
        changed_fields=sorted(changed_fields),
        merged_user_id=str(merged_user_id) if merged_user_id else "",
        subscription_id=str(subscription_id) if subscription_id else "",
        subscription_type=subscription_type,
        subscription_reachable=subscription_reachable,
    )


async def publish(conn: DBConnection, changes: Sequence[IdentityChange]) -> None:
    """Write ``changes`` to the outbox inside the caller's transaction (one statement), and
    queue their users for segment re-evaluation (one more)."""
    if changes:
        await enqueue_many(conn, IDENTITY_CHANGES, [(c.user_id, c) for c in changes])
        await segments_store.mark_dirty(conn, _touched_users(changes))


#: Facts about segment membership itself: the maintainer publishes them, re-marking their
#: users would loop.
_SEGMENT_KINDS = frozenset({Kind.KIND_SEGMENT_ENTERED, Kind.KIND_SEGMENT_EXITED})


def _touched_users(changes: Sequence[IdentityChange]) -> list[tuple[str, str]]:
    """The users whose segments a batch of facts may change: each fact's user, and a merged
    profile (gone now: its memberships are purged)."""
    touched = []
    for fact in changes:
        if fact.kind in _SEGMENT_KINDS:
            continue
        touched.append((fact.app_id, fact.user_id))
        if fact.merged_user_id:
            touched.append((fact.app_id, fact.merged_user_id))
    return touched
