"""SQL of the segment tables: definitions, members, history, the dirty-user queue.

Membership changes are one statement per segment (:func:`apply_membership`): it computes the
users matching a compiled condition, diffs them against ``segment_members``, inserts the
entries, deletes the exits, writes the exits' closed periods to the history and their
``SEGMENT_ENTERED`` / ``SEGMENT_EXITED`` facts to the outbox — set-based, whether it runs for
the whole app (a materialisation) or for a batch of users (re-evaluation). The facts are
encoded as protobuf by SQL (:func:`_facts_sql`): the fields shared by a statement's facts
(app, kind, time, segment) are serialised once here, the per-user ones (event id, user id,
external id) appended per row, so a million entries need no Python round trip per user.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from google.protobuf.timestamp_pb2 import Timestamp
from tidings.events.v1.identity_change_pb2 import IdentityChange

from services.identity.segment_sql import Compiled, Scope, SqlParams
from services.identity.validation import text_problem
from services.runtime.db import DBConnection, fetch_scalar
from services.runtime.errors import AlreadyExists, FieldViolation, InvalidArgument
from services.runtime.kafka import IDENTITY_CHANGES

__all__ = [
    "MAX_DISPLAY_NAME_LENGTH",
    "BatchDelta",
    "DirtyUser",
    "MemberRow",
    "Membership",
    "MembershipDelta",
    "SegmentRecord",
    "apply_membership",
    "batch_statement",
    "claim_dirty",
    "claim_refresh",
    "count_matching",
    "create_list_segment",
    "delete_segment",
    "dependents_of",
    "explain_row",
    "fact_fields",
    "get_segment",
    "has_segments",
    "insert_segment",
    "list_segments",
    "lock_dynamic_segments",
    "lock_segment",
    "mark_changed",
    "mark_dirty",
    "member_page",
    "membership_of",
    "membership_statement",
    "name_taken",
    "reevaluate_batch",
    "segments_by_id",
    "segments_due",
    "set_materialised",
    "update_segment",
]

#: Longest segment display name (also the longest import list name).
MAX_DISPLAY_NAME_LENGTH = 200


@dataclass(frozen=True, slots=True)
class SegmentRecord:
    """A ``segments`` row."""

    app_id: str
    segment_id: uuid.UUID
    display_name: str
    description: str
    kind: str
    condition: dict[str, Any] | None
    refers_to: list[uuid.UUID]
    time_relative: bool
    import_id: str | None
    member_count: int
    materialise_time: datetime | None
    refresh_time: datetime | None
    create_time: datetime
    update_time: datetime


_COLUMNS = (
    "app_id, segment_id, display_name, description, kind, condition, refers_to, time_relative, "
    "import_id, member_count, materialise_time, refresh_time, create_time, update_time"
)


def _segment(row: asyncpg.Record) -> SegmentRecord:
    return SegmentRecord(
        app_id=row["app_id"],
        segment_id=row["segment_id"],
        display_name=row["display_name"],
        description=row["description"],
        kind=row["kind"],
        condition=row["condition"],
        refers_to=list(row["refers_to"]),
        time_relative=row["time_relative"],
        import_id=row["import_id"],
        member_count=row["member_count"],
        materialise_time=row["materialise_time"],
        refresh_time=row["refresh_time"],
        create_time=row["create_time"],
        update_time=row["update_time"],
    )


#: Every statement references ``$2`` (now), even when its condition does not compare times:
#: PostgreSQL must know the type of each parameter it is sent.
_NOW_TYPED = "$2::timestamptz IS NOT NULL"


def name_taken(display_name: str, field: str) -> AlreadyExists:
    """The error for a display name another segment of the app has."""
    return AlreadyExists(
        f"a segment named {display_name!r} exists already",
        reason="SEGMENT_NAME_TAKEN",
        field_violations=[FieldViolation(field, "another segment has this name")],
        metadata={"display_name": display_name[:200]},
    )


# -- definitions ---------------------------------------------------------------------------------

_INSERT = f"""
INSERT INTO segments (app_id, segment_id, display_name, description, kind, condition, refers_to,
                      time_relative, import_id, materialise_time, create_time, update_time)
VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7::uuid[], $8, $9, $10, $11, $11)
ON CONFLICT (app_id, display_name) DO NOTHING
RETURNING {_COLUMNS}
"""


async def insert_segment(
    conn: DBConnection,
    app_id: str,
    *,
    segment_id: uuid.UUID,
    display_name: str,
    description: str,
    kind: str,
    condition_json: str | None,
    refers_to: Sequence[uuid.UUID],
    time_relative: bool,
    import_id: str | None,
    materialised: bool,
    at: datetime,
) -> SegmentRecord | None:
    """Insert a segment; None if the app has one of that display name already.

    ``ON CONFLICT DO NOTHING`` rather than a unique violation, so a caller's transaction (an
    import's) survives a taken name.
    """
    row = await conn.fetchrow(
        _INSERT,
        app_id,
        segment_id,
        display_name,
        description,
        kind,
        condition_json,
        list(refers_to),
        time_relative,
        import_id,
        at if materialised else None,
        at,
    )
    return _segment(row) if row is not None else None


async def get_segment(
    conn: DBConnection, app_id: str, segment_id: uuid.UUID
) -> SegmentRecord | None:
    """One segment of the app, if it exists."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM segments WHERE app_id = $1 AND segment_id = $2", app_id, segment_id
    )
    return _segment(row) if row is not None else None


async def segments_by_id(
    conn: DBConnection, app_id: str, segment_ids: Iterable[uuid.UUID], *, lock: bool = False
) -> dict[uuid.UUID, SegmentRecord]:
    """The app's segments among ``segment_ids``; ``lock`` takes ``FOR KEY SHARE`` on them (a
    condition about to refer to them keeps them from being deleted meanwhile)."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM segments WHERE app_id = $1 AND segment_id = ANY($2::uuid[]) "
        f"ORDER BY segment_id{' FOR KEY SHARE' if lock else ''}",
        app_id,
        list(segment_ids),
    )
    return {row["segment_id"]: _segment(row) for row in rows}


async def lock_segment(
    conn: DBConnection, app_id: str, segment_id: uuid.UUID
) -> SegmentRecord | None:
    """One segment, locked ``FOR NO KEY UPDATE``: the lock every writer of its members takes."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM segments WHERE app_id = $1 AND segment_id = $2 FOR NO KEY UPDATE",
        app_id,
        segment_id,
    )
    return _segment(row) if row is not None else None


async def lock_dynamic_segments(conn: DBConnection, app_id: str) -> list[SegmentRecord]:
    """Every DYNAMIC segment of the app, locked ``FOR NO KEY UPDATE`` in id order.

    The maintainer takes them all, in one order, before re-evaluating users: one writer of a
    segment's members at a time, and no deadlock between maintainers or with a
    materialisation (which locks one segment).
    """
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM segments WHERE app_id = $1 AND kind = 'dynamic' "
        "ORDER BY segment_id FOR NO KEY UPDATE",
        app_id,
    )
    return [_segment(row) for row in rows]


async def has_segments(conn: DBConnection, app_id: str) -> bool:
    """Whether the app has any segment (DYNAMIC or LIST)."""
    return bool(
        await conn.fetchval("SELECT EXISTS (SELECT 1 FROM segments WHERE app_id = $1)", app_id)
    )


async def list_segments(
    conn: DBConnection, app_id: str, *, after: str | None, limit: int
) -> list[SegmentRecord]:
    """A page of the app's segments by display name, after the name ``after``."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM segments WHERE app_id = $1 "
        "AND ($2::text IS NULL OR display_name > $2) ORDER BY display_name LIMIT $3",
        app_id,
        after,
        limit,
    )
    return [_segment(row) for row in rows]


_UPDATE = f"""
UPDATE segments SET
    display_name = $3, description = $4, condition = $5::text::jsonb, refers_to = $6::uuid[],
    time_relative = $7, materialise_time = CASE WHEN $8 THEN NULL ELSE materialise_time END,
    update_time = $9
WHERE app_id = $1 AND segment_id = $2
RETURNING {_COLUMNS}
"""


async def update_segment(
    conn: DBConnection,
    record: SegmentRecord,
    *,
    display_name: str,
    description: str,
    condition_json: str | None,
    refers_to: Sequence[uuid.UUID],
    time_relative: bool,
    rematerialise: bool,
    at: datetime,
) -> SegmentRecord | None:
    """Write a segment's new definition; None if another segment has the new name.

    The write runs in a savepoint, so a taken name leaves the caller's transaction usable.
    """
    try:
        async with conn.transaction():
            row = await conn.fetchrow(
                _UPDATE,
                record.app_id,
                record.segment_id,
                display_name,
                description,
                condition_json,
                list(refers_to),
                time_relative,
                rematerialise,
                at,
            )
    except asyncpg.UniqueViolationError:
        return None
    return _segment(row) if row is not None else None


async def dependents_of(
    conn: DBConnection, app_id: str, segment_id: uuid.UUID
) -> list[SegmentRecord]:
    """The segments whose condition refers to ``segment_id``."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM segments WHERE app_id = $1 AND refers_to @> ARRAY[$2::uuid] "
        "ORDER BY display_name",
        app_id,
        segment_id,
    )
    return [_segment(row) for row in rows]


_DELETE = """
WITH members AS (
    DELETE FROM segment_members WHERE app_id = $1 AND segment_id = $2
),
history AS (
    DELETE FROM segment_membership_history WHERE app_id = $1 AND segment_id = $2
)
DELETE FROM segments WHERE app_id = $1 AND segment_id = $2
"""


async def delete_segment(conn: DBConnection, app_id: str, segment_id: uuid.UUID) -> None:
    """Delete a segment with its members and history (lock it first: :func:`lock_segment`)."""
    await conn.execute(_DELETE, app_id, segment_id)


async def set_materialised(
    conn: DBConnection, app_id: str, segment_id: uuid.UUID, at: datetime
) -> None:
    """Record a finished full materialisation (and count as a refresh)."""
    await conn.execute(
        "UPDATE segments SET materialise_time = $3, refresh_time = $3 "
        "WHERE app_id = $1 AND segment_id = $2",
        app_id,
        segment_id,
        at,
    )


async def segments_due(
    conn: DBConnection, *, now: datetime, refresh_seconds: float, pending_grace_seconds: float
) -> list[SegmentRecord]:
    """DYNAMIC segments whose materialisation has been pending for ``pending_grace_seconds``
    (the call that saved them died before finishing it), or time-relative ones not re-checked
    for ``refresh_seconds``."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM segments WHERE kind = 'dynamic' AND ("
        "(materialise_time IS NULL AND update_time <= $1::timestamptz - make_interval(secs => $3))"
        " OR (materialise_time IS NOT NULL AND time_relative AND (refresh_time IS NULL "
        "OR refresh_time <= $1::timestamptz - make_interval(secs => $2)))) "
        "ORDER BY app_id, segment_id",
        now,
        refresh_seconds,
        pending_grace_seconds,
    )
    return [_segment(row) for row in rows]


async def claim_refresh(
    conn: DBConnection, record: SegmentRecord, *, now: datetime, refresh_seconds: float
) -> bool:
    """Claim a due re-check of a time-relative segment (one replica does it); commits alone."""
    row = await conn.fetchval(
        "UPDATE segments SET refresh_time = $3 WHERE app_id = $1 AND segment_id = $2 "
        "AND materialise_time IS NOT NULL AND (refresh_time IS NULL "
        "OR refresh_time <= $3::timestamptz - make_interval(secs => $4)) RETURNING 1",
        record.app_id,
        record.segment_id,
        now,
        refresh_seconds,
    )
    return row is not None


# -- the dirty-user queue ------------------------------------------------------------------------

_MARK = """
INSERT INTO segment_dirty_users (app_id, user_id)
SELECT DISTINCT t.app_id, t.user_id::uuid FROM unnest($1::text[], $2::text[]) AS t(app_id, user_id)
"""


async def mark_dirty(conn: DBConnection, users: Iterable[tuple[str, uuid.UUID | str]]) -> None:
    """Queue users whose segment membership may have changed, in the caller's transaction.

    Call it in the transaction of the change (a profile write, stored events...), so the mark
    commits with it and the maintainer re-evaluates them once it is visible. Cheap: one
    insert, never a lock wait.
    """
    pairs = {(app_id, str(user_id)) for app_id, user_id in users if user_id}
    if not pairs:
        return
    await conn.execute(_MARK, [a for a, _ in pairs], [u for _, u in pairs])


@dataclass(frozen=True, slots=True)
class DirtyUser:
    """A claimed mark."""

    app_id: str
    user_id: uuid.UUID
    mark_time: datetime


_CLAIM = """
DELETE FROM segment_dirty_users WHERE id IN (
    SELECT id FROM segment_dirty_users ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
)
RETURNING app_id, user_id, mark_time
"""


async def claim_dirty(conn: DBConnection, limit: int) -> list[DirtyUser]:
    """Take up to ``limit`` marks, oldest first, deleting them in the caller's transaction.

    If that transaction rolls back (or the process dies), the marks are back for the next
    claim; marks other maintainers hold are skipped.
    """
    rows = await conn.fetch(_CLAIM, limit)
    return [DirtyUser(row["app_id"], row["user_id"], row["mark_time"]) for row in rows]


# -- membership ----------------------------------------------------------------------------------


def fact_fields(
    app_id: str, segment_id: uuid.UUID, kind: IdentityChange.Kind.ValueType, at: datetime
) -> bytes:
    """The protobuf encoding of the fields every fact of one statement shares."""
    occurred_at = Timestamp()
    occurred_at.FromDatetime(at)
    return IdentityChange(
        app_id=app_id, kind=kind, occurred_at=occurred_at, segment_id=str(segment_id)
    ).SerializeToString()


def _facts_sql(source: str, params: SqlParams) -> str:
    """An INSERT of one ``IdentityChange`` per row of ``source`` (user_id, external_id,
    fields) into the outbox, like :func:`services.runtime.outbox.enqueue_many` writes them.

    Field 1, the event id, is ``<a UUID of this statement>.<user id>`` (73 characters, tag
    0x0a, length 0x49): unique, since a statement has one fact per user, without drawing a
    random number per row (``gen_random_uuid()`` would be a third of the statement's cost).
    Field 3, the user id, is 36 characters (tag 0x1a, length 0x24); field 6, the external id
    (tag 0x32), is omitted when empty, as proto3 does. Ids are ASCII, the same bytes in any
    server encoding.
    """
    topic = params.add(IDENTITY_CHANGES.name, "text")
    event_type = params.add(IDENTITY_CHANGES.event_type, "text")
    prefix = params.add(f"{uuid.uuid4()}.", "text")
    return f"""
        INSERT INTO outbox (topic, key, event_type, payload)
        SELECT {topic}, f.user_id::text, {event_type},
               '\\x0a49'::bytea || textsend({prefix} || f.user_id::text) || f.fields
               || '\\x1a24'::bytea || textsend(f.user_id::text)
               || segment_pb_string('\\x32'::bytea, f.external_id)
        FROM ({source}) AS f
    """


@dataclass(frozen=True, slots=True)
class MembershipDelta:
    """What one membership statement changed.

    Attributes:
        entered: Users who entered.
        exited: Users who left (and still exist).
        removed: Memberships deleted (exits plus erased users' leftovers).
    """

    entered: int
    exited: int
    removed: int


def membership_statement(
    segment: SegmentRecord, compiled: Compiled, *, at: datetime, mark_changed_users: bool
) -> tuple[str, list[Any]]:
    """The SQL and parameters of :func:`apply_membership` (also for EXPLAIN in benchmarks).

    The difference is one FULL JOIN of the matching users with the current members, keeping
    the rows on one side only: a hash join whatever the sizes, where NOT EXISTS against a CTE
    could be planned as a nested loop over two million-row lists.
    """
    p = SqlParams(list(compiled.params.values))
    batch = compiled.scope is Scope.BATCH
    segment_id = p.add(segment.segment_id, "uuid")
    entered_fields = p.add(
        fact_fields(segment.app_id, segment.segment_id, IdentityChange.KIND_SEGMENT_ENTERED, at),
        "bytea",
    )
    exited_fields = p.add(
        fact_fields(segment.app_id, segment.segment_id, IdentityChange.KIND_SEGMENT_EXITED, at),
        "bytea",
    )
    members_batch = " AND m.user_id = ANY($3::uuid[])" if batch else ""
    users_batch = " AND u.user_id = ANY($3::uuid[])" if batch else ""
    facts = _facts_sql(
        f"""SELECT user_id, external_id, {entered_fields} AS fields FROM diff WHERE entering
            UNION ALL
            SELECT user_id, external_id, {exited_fields} FROM exited""",
        p,
    )
    marked = (
        """,
    marked AS (
        INSERT INTO segment_dirty_users (app_id, user_id) SELECT $1, user_id FROM diff
    )"""
        if mark_changed_users
        else ""
    )
    sql = f"""
    WITH diff AS MATERIALIZED (
        SELECT coalesce(x.user_id, c.user_id) AS user_id, x.external_id,
               x.user_id IS NOT NULL AS entering
        FROM (SELECT u.user_id, u.external_id FROM users u
              WHERE u.app_id = $1{users_batch} AND {compiled.sql}) AS x
        FULL JOIN (SELECT m.user_id FROM segment_members m
                   WHERE m.app_id = $1 AND m.segment_id = {segment_id}{members_batch}) AS c
          ON c.user_id = x.user_id
        WHERE x.user_id IS NULL OR c.user_id IS NULL
    ),
    entered AS (
        INSERT INTO segment_members (app_id, segment_id, user_id, enter_time)
        SELECT $1, {segment_id}, user_id, $2::timestamptz FROM diff WHERE entering
        RETURNING user_id
    ),
    removed AS (
        DELETE FROM segment_members m USING diff d
        WHERE m.app_id = $1 AND m.segment_id = {segment_id} AND m.user_id = d.user_id
          AND NOT d.entering
        RETURNING m.user_id, m.enter_time
    ),
    exited AS MATERIALIZED (
        SELECT r.user_id, r.enter_time, u.external_id
        FROM removed r JOIN users u ON u.app_id = $1 AND u.user_id = r.user_id
    ),
    history AS (
        INSERT INTO segment_membership_history (app_id, segment_id, user_id, enter_time, exit_time)
        SELECT $1, {segment_id}, user_id, enter_time, $2::timestamptz FROM exited
        ON CONFLICT DO NOTHING
    ),
    facts AS ({facts}){marked},
    counted AS (
        UPDATE segments SET member_count = member_count
            + (SELECT count(*) FROM entered) - (SELECT count(*) FROM removed)
        WHERE app_id = $1 AND segment_id = {segment_id} AND EXISTS (SELECT 1 FROM diff)
    )
    SELECT (SELECT count(*) FROM entered) AS entered, (SELECT count(*) FROM exited) AS exited,
           (SELECT count(*) FROM removed) AS removed
    """
    return sql, p.values


async def apply_membership(
    conn: DBConnection,
    segment: SegmentRecord,
    compiled: Compiled,
    *,
    at: datetime,
    mark_changed_users: bool = False,
) -> MembershipDelta:
    """Make the segment's members those matching ``compiled`` (for its scope), with history
    and facts, in one statement.

    Call it holding the segment's lock (:func:`lock_segment` or
    :func:`lock_dynamic_segments`): the difference is computed against the members as this
    statement sees them, so no one else may change them meanwhile. In BATCH scope only the
    batch's users are compared.

    Args:
        conn: A connection in a transaction.
        segment: The segment (its ``app_id`` is ``compiled``'s ``$1``).
        compiled: Its condition, compiled with ``now = at``.
        at: Enter / exit time and the facts' time.
        mark_changed_users: Also queue every user who entered or left, so the segments
            referring to this one re-evaluate them (a materialisation outside the maintainer).
    """
    sql, params = membership_statement(
        segment, compiled, at=at, mark_changed_users=mark_changed_users
    )
    row = await conn.fetchrow(sql, *params)
    assert row is not None
    return MembershipDelta(entered=row["entered"], exited=row["exited"], removed=row["removed"])


@dataclass(frozen=True, slots=True)
class BatchDelta:
    """What one re-evaluation statement changed.

    Attributes:
        entered: Entries (facts published).
        exited: Exits of users who still exist (facts published).
        purged: Memberships of erased users forgotten (no facts).
    """

    entered: int
    exited: int
    purged: int


def batch_statement(
    app_id: str,
    evaluations: Sequence[tuple[SegmentRecord, str]],
    params: SqlParams,
    *,
    at: datetime,
    purge: bool,
) -> str:
    """The statement of :func:`reevaluate_batch` (also for EXPLAIN in benchmarks).

    The batch's users are read once (``batch``) and every segment's condition is evaluated
    over that; each segment then has its own difference, entries, exits and history, and one
    outbox insert and one update of the member counts serve them all (a row may be changed
    only once per statement).
    """
    blocks: list[str] = []
    facts: list[str] = []
    deltas: list[str] = []
    for index, (segment, condition) in enumerate(evaluations):
        k = f"_{index}"
        segment_id = params.add(segment.segment_id, "uuid")
        entered_fields = params.add(
            fact_fields(app_id, segment.segment_id, IdentityChange.KIND_SEGMENT_ENTERED, at),
            "bytea",
        )
        exited_fields = params.add(
            fact_fields(app_id, segment.segment_id, IdentityChange.KIND_SEGMENT_EXITED, at),
            "bytea",
        )
        blocks.append(f"""
    diff{k} AS MATERIALIZED (
        SELECT coalesce(x.user_id, c.user_id) AS user_id, x.external_id,
               x.user_id IS NOT NULL AS entering
        FROM (SELECT u.user_id, u.external_id FROM batch u WHERE {condition}) AS x
        FULL JOIN (SELECT m.user_id FROM segment_members m
                   WHERE m.app_id = $1 AND m.segment_id = {segment_id}
                     AND m.user_id IN (SELECT user_id FROM batch)) AS c
          ON c.user_id = x.user_id
        WHERE x.user_id IS NULL OR c.user_id IS NULL
    ),
    entered{k} AS (
        INSERT INTO segment_members (app_id, segment_id, user_id, enter_time)
        SELECT $1, {segment_id}, user_id, $2::timestamptz FROM diff{k} WHERE entering
        RETURNING user_id
    ),
    exited{k} AS (
        DELETE FROM segment_members m USING diff{k} d
        WHERE m.app_id = $1 AND m.segment_id = {segment_id} AND m.user_id = d.user_id
          AND NOT d.entering
        RETURNING m.user_id, m.enter_time
    ),
    history{k} AS (
        INSERT INTO segment_membership_history (app_id, segment_id, user_id, enter_time, exit_time)
        SELECT $1, {segment_id}, user_id, enter_time, $2::timestamptz FROM exited{k}
        ON CONFLICT DO NOTHING
    ),""")
        facts.append(
            f"SELECT user_id, external_id, {entered_fields} AS fields FROM diff{k} WHERE entering"
        )
        facts.append(
            f"SELECT r.user_id, b.external_id, {exited_fields} FROM exited{k} r "
            "JOIN batch b USING (user_id)"
        )
        deltas.append(
            f"SELECT {segment_id} AS segment_id, "
            f"(SELECT count(*) FROM entered{k}) - (SELECT count(*) FROM exited{k}) AS delta"
        )
    if purge:
        blocks.append("""
    gone AS (
        SELECT DISTINCT g.user_id FROM unnest($3::uuid[]) AS g(user_id)
        WHERE g.user_id NOT IN (SELECT user_id FROM batch)
    ),
    purged AS (
        -- Segment by segment through the primary key; LIST segments too.
        DELETE FROM segment_members m USING gone g, segments s
        WHERE s.app_id = $1 AND m.app_id = $1 AND m.segment_id = s.segment_id
          AND m.user_id = g.user_id
        RETURNING m.segment_id
    ),
    purged_history AS (
        DELETE FROM segment_membership_history h USING gone g
        WHERE h.app_id = $1 AND h.user_id = g.user_id
    ),""")
        deltas.append("SELECT segment_id, -count(*) FROM purged GROUP BY segment_id")
    entered = " + ".join(f"(SELECT count(*) FROM entered_{i})" for i in range(len(evaluations)))
    exited = " + ".join(f"(SELECT count(*) FROM exited_{i})" for i in range(len(evaluations)))
    facts_sql = f"facts AS ({_facts_sql(' UNION ALL '.join(facts), params)})," if facts else ""
    return f"""
    WITH batch AS MATERIALIZED (
        SELECT u.* FROM users u WHERE u.app_id = $1 AND u.user_id = ANY($3::uuid[])
    ),{"".join(blocks)}
    {facts_sql}
    counted AS (
        UPDATE segments s SET member_count = s.member_count + d.delta
        FROM (SELECT segment_id, sum(delta)::bigint AS delta
              FROM ({" UNION ALL ".join(deltas) or "SELECT NULL::uuid, 0"}) AS t(segment_id, delta)
              GROUP BY segment_id) AS d
        WHERE s.app_id = $1 AND s.segment_id = d.segment_id AND d.delta <> 0
    )
    SELECT {entered or "0"} AS entered, {exited or "0"} AS exited,
           {"(SELECT count(*) FROM purged)" if purge else "0"} AS purged,
           $2::timestamptz AS at
    """


async def reevaluate_batch(
    conn: DBConnection,
    app_id: str,
    evaluations: Sequence[tuple[SegmentRecord, str]],
    params: SqlParams,
    *,
    at: datetime,
    purge: bool,
) -> BatchDelta:
    """Re-evaluate a batch of users against segments in one statement, applying the result.

    Call it holding the segments' locks (:func:`lock_dynamic_segments`). The segments'
    conditions must not refer to one another (one statement sees one snapshot): evaluate
    segments that refer to others in a later call.

    Args:
        conn: A connection in a transaction.
        app_id: The app (``$1`` of ``params``).
        evaluations: Each segment with its condition compiled in BATCH scope into ``params``.
        params: ``$1`` app id, ``$2`` ``at``, ``$3`` the users, then the conditions'
            parameters; this call adds its own.
        at: Enter / exit time and the facts' time.
        purge: Also forget the memberships and history of the batch's users that no longer
            exist (erased or merged away), without facts.
    """
    p = SqlParams(list(params.values))
    sql = batch_statement(app_id, evaluations, p, at=at, purge=purge)
    row = await conn.fetchrow(sql, *p.values)
    assert row is not None
    return BatchDelta(entered=row["entered"], exited=row["exited"], purged=row["purged"])


async def mark_changed(conn: DBConnection, segment: SegmentRecord, compiled: Compiled) -> int:
    """Queue the users whose membership differs from ``compiled`` (ALL scope) without changing
    it: the scheduled re-check of a time-relative segment hands them to the maintainer, which
    applies the change under the segment's lock with the usual per-user rules.

    Returns:
        How many users were queued.
    """
    p = SqlParams(list(compiled.params.values))
    segment_id = p.add(segment.segment_id, "uuid")
    sql = f"""
    WITH matching AS MATERIALIZED (
        SELECT u.user_id FROM users u WHERE u.app_id = $1 AND {compiled.sql} AND {_NOW_TYPED}
    ),
    current AS MATERIALIZED (
        SELECT m.user_id FROM segment_members m WHERE m.app_id = $1 AND m.segment_id = {segment_id}
    ),
    changed AS (
        (SELECT user_id FROM matching EXCEPT SELECT user_id FROM current)
        UNION ALL
        (SELECT user_id FROM current EXCEPT SELECT user_id FROM matching)
    ),
    marked AS (
        INSERT INTO segment_dirty_users (app_id, user_id) SELECT $1, user_id FROM changed
        RETURNING 1
    )
    SELECT count(*) FROM marked
    """
    return int(await conn.fetchval(sql, *p.values))


async def count_matching(conn: DBConnection, compiled: Compiled) -> int:
    """How many of the app's users match ``compiled`` (ALL scope) now."""
    sql = f"SELECT count(*) FROM users u WHERE u.app_id = $1 AND {compiled.sql} AND {_NOW_TYPED}"
    # Read whole, not as one row: a count over a million users gets its parallel workers.
    return int(await fetch_scalar(conn, sql, *compiled.params.values))


async def explain_row(
    conn: DBConnection, columns: Sequence[str], params: SqlParams
) -> asyncpg.Record | None:
    """One row of ``columns`` (SQL over ``users u``) for the one user of a BATCH scope; None if
    the user does not exist."""
    sql = (
        f"SELECT {', '.join(f'{c} AS c{i}' for i, c in enumerate(columns)) or 'true'} "
        f"FROM users u WHERE u.app_id = $1 AND u.user_id = ANY($3::uuid[]) AND {_NOW_TYPED}"
    )
    return await conn.fetchrow(sql, *params.values)


# -- import lists --------------------------------------------------------------------------------


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def create_list_segment(
    conn: DBConnection,
    app_id: str,
    *,
    display_name: str,
    import_id: str,
    members_table: str,
    at: datetime,
    field: str = "options.list_name",
) -> str:
    """Create a LIST segment holding the users of ``members_table``, inside the caller's
    transaction (an import's): the segment, its members, and one ``KIND_SEGMENT_ENTERED`` fact
    per member through the outbox, in bulk.

    Members are the distinct ``user_id`` values of ``members_table`` that are users of the
    app; the membership periods start at ``at`` (a current member's open period is its
    ``segment_members`` row, so GetSegmentMembership shows it from then).

    Args:
        conn: A connection inside the caller's transaction.
        app_id: The app.
        display_name: The segment's name, unique in the app.
        import_id: The import job that made it.
        members_table: A table (typically temporary) with a ``user_id uuid`` column; an
            identifier chosen by code, quoted here.
        at: Creation and entry time.
        field: The request field the name came from, for errors.

    Returns:
        The new segment's id.

    Raises:
        InvalidArgument: ``display_name`` is empty, too long or has control characters.
        AlreadyExists: ``SEGMENT_NAME_TAKEN``: the app has a segment of that name.
    """
    problem = (
        "must not be empty"
        if not display_name.strip()
        else text_problem(display_name, max_length=MAX_DISPLAY_NAME_LENGTH)
    )
    if problem is not None:
        raise InvalidArgument(
            f"invalid list name: {problem}",
            reason="INVALID_SEGMENT_NAME",
            field_violations=[FieldViolation(field, problem, "INVALID_SEGMENT_NAME")],
        )
    segment = await insert_segment(
        conn,
        app_id,
        segment_id=uuid.uuid4(),
        display_name=display_name,
        description="",
        kind="list",
        condition_json=None,
        refers_to=(),
        time_relative=False,
        import_id=import_id,
        materialised=True,
        at=at,
    )
    if segment is None:
        raise name_taken(display_name, field)
    p = SqlParams([app_id, at, segment.segment_id])
    fields = p.add(
        fact_fields(app_id, segment.segment_id, IdentityChange.KIND_SEGMENT_ENTERED, at), "bytea"
    )
    facts = _facts_sql(f"SELECT user_id, external_id, {fields} AS fields FROM members", p)
    sql = f"""
    WITH members AS MATERIALIZED (
        SELECT u.user_id, u.external_id FROM users u
        WHERE u.app_id = $1
          AND u.user_id IN (SELECT t.user_id FROM {_quote_identifier(members_table)} t)
    ),
    entered AS (
        INSERT INTO segment_members (app_id, segment_id, user_id, enter_time)
        SELECT $1, $3::uuid, user_id, $2::timestamptz FROM members
    ),
    facts AS ({facts})
    UPDATE segments SET member_count = (SELECT count(*) FROM members)
    WHERE app_id = $1 AND segment_id = $3::uuid
    """
    await conn.execute(sql, *p.values)
    return str(segment.segment_id)


# -- reading members -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberRow:
    """A current member."""

    user_id: uuid.UUID
    external_id: str | None
    enter_time: datetime


async def member_page(
    conn: DBConnection,
    app_id: str,
    segment_id: uuid.UUID,
    *,
    after: uuid.UUID | None,
    limit: int,
) -> list[MemberRow]:
    """Members in user id order after ``after`` (keyset paging)."""
    rows = await conn.fetch(
        """
        SELECT m.user_id, u.external_id, m.enter_time
        FROM segment_members m
        JOIN users u ON u.app_id = m.app_id AND u.user_id = m.user_id
        WHERE m.app_id = $1 AND m.segment_id = $2
          AND m.user_id > coalesce($3::uuid, '00000000-0000-0000-0000-000000000000'::uuid)
        ORDER BY m.user_id
        LIMIT $4
        """,
        app_id,
        segment_id,
        after,
        limit,
    )
    return [MemberRow(row["user_id"], row["external_id"], row["enter_time"]) for row in rows]


@dataclass(frozen=True, slots=True)
class Membership:
    """A user's membership of one segment: the open period (if a member) and closed ones."""

    enter_time: datetime | None
    periods: list[tuple[datetime, datetime]]


async def membership_of(
    conn: DBConnection, app_id: str, segment_id: uuid.UUID, user_id: uuid.UUID
) -> Membership:
    """The user's current membership and closed periods (oldest first)."""
    enter_time = await conn.fetchval(
        "SELECT enter_time FROM segment_members WHERE app_id = $1 AND segment_id = $2 "
        "AND user_id = $3",
        app_id,
        segment_id,
        user_id,
    )
    rows = await conn.fetch(
        "SELECT enter_time, exit_time FROM segment_membership_history "
        "WHERE app_id = $1 AND user_id = $3 AND segment_id = $2 ORDER BY enter_time",
        app_id,
        segment_id,
        user_id,
    )
    return Membership(enter_time, [(row["enter_time"], row["exit_time"]) for row in rows])
