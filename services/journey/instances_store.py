"""SQL for the engine's state: ``instances``, ``path_steps``, ``entries``, ``send_receipts``.

Set-based: a batch of customers travels as parallel arrays through ``unnest``, one statement
per batch. Every statement is scoped by ``app_id``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from services.runtime.db import DBConnection

__all__ = [
    "TRANSIENT_REFUSALS",
    "Instance",
    "RouteRows",
    "StepRow",
    "any_due",
    "claim_due",
    "enter_routed",
    "exit_all",
    "insert_entries",
    "lock_instances",
    "move_routed",
    "park",
    "save_instances",
    "seen_triggers",
    "unpark",
    "upsert_steps",
]

ACTIVE_STATUSES = ("active", "waiting")
#: Entry refusals that say "not now" rather than "never for this trigger": their ``entries``
#: row does not use up the trigger (see :func:`insert_entries`).
TRANSIENT_REFUSALS = ("OUTSIDE_SCHEDULE", "CONCURRENCY_LIMIT")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def micros(values: Iterable[datetime | None]) -> list[int | None]:
    """Timestamps as microseconds since the epoch, for a ``bigint[]`` parameter that SQL turns
    back with :func:`_ts`.

    asyncpg encodes each ``timestamptz`` with several Python-level operations (the bulk of a
    batch's encoding cost); the values of one batch are mostly the same instant (the claim's
    "now"), converted once here.
    """
    memo: dict[datetime, int] = {}
    out: list[int | None] = []
    for value in values:
        if value is None:
            out.append(None)
            continue
        found = memo.get(value)
        if found is None:
            aware = value if value.tzinfo is not None else value.astimezone(UTC)
            found = memo[value] = (aware - _EPOCH) // _MICROSECOND
        out.append(found)
    return out


def _ts(column: str) -> str:
    """SQL turning a microseconds-since-epoch column back into a timestamptz (NULL stays)."""
    return f"(timestamptz 'epoch' + {column} * interval '1 microsecond')"


@dataclass(slots=True)
class Instance:
    """One customer in one journey (a row of ``instances``)."""

    app_id: str
    journey_id: uuid.UUID
    user_id: uuid.UUID
    visit: int
    version: int
    node_id: str
    status: str
    waiting_for: str
    wake_at: datetime | None
    parked_wake_at: datetime | None
    pending_output: str
    seq: int
    enter_time: datetime
    node_enter_time: datetime
    exit_time: datetime | None
    trigger_id: str
    trigger_properties: dict[str, Any] = field(default_factory=dict)
    counts_for_reentry: bool = True
    #: The row's physical address (``ctid``) while a claim holds its lock: stable until this
    #: transaction changes the row, and the cheapest way back to it (see :func:`move_routed`).
    tid: Any = None

    def copy(self) -> Instance:
        """A copy to change."""
        # Positional: several times cheaper than dataclasses.replace, and this runs per step.
        return Instance(
            self.app_id,
            self.journey_id,
            self.user_id,
            self.visit,
            self.version,
            self.node_id,
            self.status,
            self.waiting_for,
            self.wake_at,
            self.parked_wake_at,
            self.pending_output,
            self.seq,
            self.enter_time,
            self.node_enter_time,
            self.exit_time,
            self.trigger_id,
            self.trigger_properties,
            self.counts_for_reentry,
            self.tid,
        )

    @property
    def inside(self) -> bool:
        """Whether the customer is still in the journey."""
        return self.status in ACTIVE_STATUSES


_COLUMNS = (
    "app_id, journey_id, user_id, visit, version, node_id, status, waiting_for, wake_at, "
    "parked_wake_at, pending_output, seq, enter_time, node_enter_time, exit_time, trigger_id, "
    "trigger_properties, counts_for_reentry"
)


# What reads rows selects: empty trigger properties (most customers') come back as NULL, which
# costs nothing to decode, where '{}' costs a json.loads per row.
_SELECT_COLUMNS = _COLUMNS.replace(
    "trigger_properties", "NULLIF(trigger_properties, '{}'::jsonb) AS trigger_properties"
)


def _instance(record: Any) -> Instance:
    # Positional: the selected columns are in the order of Instance's fields.
    instance = Instance(*record)
    if instance.trigger_properties is None:
        instance.trigger_properties = {}
    return instance


@dataclass(frozen=True, slots=True)
class StepRow:
    """A path step to write: a new arrival, or the departure of an open one."""

    app_id: str
    journey_id: uuid.UUID
    user_id: uuid.UUID
    visit: int
    seq: int
    node_id: str
    output: str
    enter_time: datetime
    exit_time: datetime | None


async def any_due(conn: DBConnection, now: datetime) -> bool:
    """Whether some customer's wake time has come (locked ones included)."""
    # In the order of ``instances_due``, as the claim reads it: a plan cached for any ``now``
    # stays an index scan (an EXISTS could become a scan of the table, long when none is due).
    found = await conn.fetchval(
        "SELECT 1 FROM instances WHERE wake_at <= $1 ORDER BY wake_at LIMIT 1",
        now,
    )
    return found is not None


async def claim_due(conn: DBConnection, now: datetime, limit: int) -> list[Instance]:
    """Lock up to ``limit`` customers whose wake time has come, oldest first.

    ``SKIP LOCKED``: rows another replica (or a consumer) holds are left to it. The caller steps
    them and saves them in the same transaction.
    """
    records = await conn.fetch(
        f"""
        SELECT {_SELECT_COLUMNS}, ctid FROM instances
        WHERE wake_at <= $1
        ORDER BY wake_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED
        """,
        now,
        limit,
    )
    return [_instance(r) for r in records]


async def lock_instances(
    conn: DBConnection, app_id: str, journey_id: uuid.UUID, user_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, Instance]:
    """The rows of these customers in one journey, locked (missing ones left out).

    One index lookup per id, in id order: with ``user_id = ANY(...)`` of a thousand ids the
    planner scans the whole table (it prices each lookup as a disk read), which an entry page
    paid for in every transaction once a journey held some tens of thousands of customers."""
    records = await conn.fetch(
        f"""
        SELECT i.* FROM (SELECT u FROM unnest($3::uuid[]) AS u ORDER BY u) AS ids(user_id)
        CROSS JOIN LATERAL (
            SELECT {_SELECT_COLUMNS} FROM instances
            WHERE app_id = $1 AND journey_id = $2 AND user_id = ids.user_id
            FOR UPDATE
        ) AS i
        """,
        app_id,
        journey_id,
        list(user_ids),
    )
    return {r["user_id"]: _instance(r) for r in records}


async def lock_inside_of_users(
    conn: DBConnection, pairs: Sequence[tuple[str, uuid.UUID]]
) -> list[Instance]:
    """Every journey these (app, user) customers are inside, locked."""
    if not pairs:
        return []
    records = await conn.fetch(
        f"""
        SELECT {_SELECT_COLUMNS} FROM instances
        WHERE (app_id, user_id) IN (
            SELECT * FROM unnest($1::text[], $2::uuid[])
        ) AND status IN ('active', 'waiting')
        ORDER BY app_id, journey_id, user_id
        FOR UPDATE
        """,
        [p[0] for p in pairs],
        [p[1] for p in pairs],
    )
    return [_instance(r) for r in records]


async def journeys_of_users(
    conn: DBConnection, pairs: Sequence[tuple[str, uuid.UUID]]
) -> set[tuple[str, uuid.UUID]]:
    """The (app, journey) of every journey these customers are inside, read without locks
    (to lock the journeys' rows before the customers')."""
    if not pairs:
        return set()
    records = await conn.fetch(
        """
        SELECT DISTINCT app_id, journey_id FROM instances
        WHERE (app_id, user_id) IN (SELECT * FROM unnest($1::text[], $2::uuid[]))
          AND status IN ('active', 'waiting')
        """,
        [p[0] for p in pairs],
        [p[1] for p in pairs],
    )
    return {(r["app_id"], r["journey_id"]) for r in records}


async def get_instance(
    conn: DBConnection, app_id: str, journey_id: uuid.UUID, user_id: uuid.UUID
) -> Instance | None:
    """One customer's row."""
    record = await conn.fetchrow(
        f"SELECT {_SELECT_COLUMNS} FROM instances"
        " WHERE app_id = $1 AND journey_id = $2 AND user_id = $3",
        app_id,
        journey_id,
        user_id,
    )
    return None if record is None else _instance(record)


async def list_instances(
    conn: DBConnection,
    app_id: str,
    journey_id: uuid.UUID,
    node_id: str,
    after: uuid.UUID | None,
    limit: int,
) -> list[Instance]:
    """Customers of a journey by user id (at one node, inside, when ``node_id`` is set)."""
    records = await conn.fetch(
        f"""
        SELECT {_SELECT_COLUMNS} FROM instances
        WHERE app_id = $1 AND journey_id = $2
          AND ($3 = '' OR (node_id = $3 AND status IN ('active', 'waiting')))
          AND ($4::uuid IS NULL OR user_id > $4)
        ORDER BY user_id
        LIMIT $5
        """,
        app_id,
        journey_id,
        node_id,
        after,
        limit,
    )
    return [_instance(r) for r in records]


async def path_of(
    conn: DBConnection, app_id: str, journey_id: uuid.UUID, user_id: uuid.UUID, visit: int
) -> list[StepRow]:
    """The steps of one visit, oldest first."""
    records = await conn.fetch(
        """
        SELECT app_id, journey_id, user_id, visit, seq, node_id, output, enter_time, exit_time
        FROM path_steps
        WHERE app_id = $1 AND journey_id = $2 AND user_id = $3 AND visit = $4
        ORDER BY seq
        """,
        app_id,
        journey_id,
        user_id,
        visit,
    )
    return [StepRow(**dict(r)) for r in records]


# What moving through a journey changes (visit, version, entry and trigger are fixed for a
# visit and written by entry).
_SAVE = f"""
UPDATE instances AS i SET
    node_id = s.node_id, status = s.status, waiting_for = s.waiting_for,
    wake_at = {_ts("s.wake_at")}, parked_wake_at = {_ts("s.parked_wake_at")},
    pending_output = s.pending_output, seq = s.seq,
    node_enter_time = {_ts("s.node_enter_time")}, exit_time = {_ts("s.exit_time")},
    counts_for_reentry = s.counts_for_reentry
FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[],
            $7::bigint[], $8::bigint[], $9::text[], $10::int[], $11::bigint[],
            $12::bigint[], $13::boolean[])
     AS s(app_id, journey_id, user_id, node_id, status, waiting_for, wake_at, parked_wake_at,
          pending_output, seq, node_enter_time, exit_time, counts_for_reentry)
WHERE i.app_id = s.app_id AND i.journey_id = s.journey_id AND i.user_id = s.user_id
"""

#: Instance fields that are timestamps (sent as microseconds, see :func:`micros`).
_TIMESTAMPS = frozenset(("wake_at", "parked_wake_at", "enter_time", "node_enter_time", "exit_time"))


def _columns(instances: Sequence[Instance], names: Sequence[str]) -> list[list[Any]]:
    columns: list[list[Any]] = []
    for name in names:
        values = [getattr(i, name) for i in instances]
        if name in _TIMESTAMPS:
            values = micros(values)
        elif name == "trigger_properties":
            values = [v or None for v in values]  # NULL for {}: no json.dumps per row
        columns.append(values)
    return columns


async def save_instances(conn: DBConnection, instances: Sequence[Instance]) -> None:
    """Write back the state of existing rows (one statement)."""
    if not instances:
        return
    await conn.execute(
        _SAVE,
        *_columns(
            instances,
            (
                "app_id",
                "journey_id",
                "user_id",
                "node_id",
                "status",
                "waiting_for",
                "wake_at",
                "parked_wake_at",
                "pending_output",
                "seq",
                "node_enter_time",
                "exit_time",
                "counts_for_reentry",
            ),
        ),
    )


_UPSERT_ENTERED = """
INSERT INTO instances (app_id, journey_id, user_id, visit, version, node_id, status,
                       waiting_for, wake_at, parked_wake_at, pending_output, seq, enter_time,
                       node_enter_time, exit_time, trigger_id, trigger_properties,
                       counts_for_reentry)
SELECT s.app_id, s.journey_id, s.user_id, s.visit, s.version, s.node_id, 'active', '', s.at,
       NULL, '', 1, s.at, s.at, NULL, s.trigger_id, COALESCE(s.props, '{}'::jsonb), true
FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::int[], $5::int[], $6::text[],
            $7::timestamptz[], $8::text[], $9::jsonb[])
     AS s(app_id, journey_id, user_id, visit, version, node_id, at, trigger_id, props)
ON CONFLICT (app_id, journey_id, user_id) DO UPDATE SET
    visit = excluded.visit, version = excluded.version, node_id = excluded.node_id,
    status = 'active', waiting_for = '', wake_at = excluded.wake_at, parked_wake_at = NULL,
    pending_output = '', seq = 1, enter_time = excluded.enter_time,
    node_enter_time = excluded.node_enter_time, exit_time = NULL,
    trigger_id = excluded.trigger_id, trigger_properties = excluded.trigger_properties,
    counts_for_reentry = true
"""


async def insert_entered(
    conn: DBConnection,
    app_id: str,
    journey_id: uuid.UUID,
    version: int,
    start_node: str,
    entered: Sequence[tuple[uuid.UUID, int, str, dict[str, Any]]],
    at: datetime,
) -> None:
    """Put customers at the start node (``(user_id, visit, trigger_id, properties)``), due now,
    with the first step of their path."""
    if not entered:
        return
    n = len(entered)
    await conn.execute(
        _UPSERT_ENTERED,
        [app_id] * n,
        [journey_id] * n,
        [e[0] for e in entered],
        [e[1] for e in entered],
        [version] * n,
        [start_node] * n,
        [at] * n,
        [e[2] for e in entered],
        [e[3] or None for e in entered],
    )
    await upsert_steps(
        conn,
        [StepRow(app_id, journey_id, e[0], e[1], 1, start_node, "", at, None) for e in entered],
    )


_UPSERT_INSTANCES = f"""
INSERT INTO instances (app_id, journey_id, user_id, visit, version, node_id, status,
                       waiting_for, wake_at, parked_wake_at, pending_output, seq, enter_time,
                       node_enter_time, exit_time, trigger_id, trigger_properties,
                       counts_for_reentry)
SELECT s.app_id, s.journey_id, s.user_id, s.visit, s.version, s.node_id, s.status,
       s.waiting_for, {_ts("s.wake_at")}, {_ts("s.parked_wake_at")}, s.pending_output, s.seq,
       {_ts("s.enter_time")}, {_ts("s.node_enter_time")}, {_ts("s.exit_time")}, s.trigger_id,
       COALESCE(s.trigger_properties, '{{}}'::jsonb), s.counts_for_reentry
FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::int[], $5::int[], $6::text[],
            $7::text[], $8::text[], $9::bigint[], $10::bigint[], $11::text[],
            $12::int[], $13::bigint[], $14::bigint[], $15::bigint[],
            $16::text[], $17::jsonb[], $18::boolean[])
     AS s(app_id, journey_id, user_id, visit, version, node_id, status, waiting_for, wake_at,
          parked_wake_at, pending_output, seq, enter_time, node_enter_time, exit_time,
          trigger_id, trigger_properties, counts_for_reentry)
ON CONFLICT (app_id, journey_id, user_id) DO UPDATE SET
    visit = excluded.visit, version = excluded.version, node_id = excluded.node_id,
    status = excluded.status, waiting_for = excluded.waiting_for, wake_at = excluded.wake_at,
    parked_wake_at = excluded.parked_wake_at, pending_output = excluded.pending_output,
    seq = excluded.seq, enter_time = excluded.enter_time,
    node_enter_time = excluded.node_enter_time, exit_time = excluded.exit_time,
    trigger_id = excluded.trigger_id, trigger_properties = excluded.trigger_properties,
    counts_for_reentry = excluded.counts_for_reentry
"""

_ALL_COLUMNS = tuple(name.strip() for name in _COLUMNS.split(","))


async def upsert_instances(conn: DBConnection, instances: Sequence[Instance]) -> None:
    """Write whole rows, new or replacing (a new visit), in one statement."""
    if instances:
        await conn.execute(_UPSERT_INSTANCES, *_columns(instances, _ALL_COLUMNS))


_UPSERT_STEPS = f"""
INSERT INTO path_steps (app_id, journey_id, user_id, visit, seq, node_id, output, enter_time,
                        exit_time)
SELECT s.app_id, s.journey_id, s.user_id, s.visit, s.seq, s.node_id, s.output,
       {_ts("s.enter_time")}, {_ts("s.exit_time")}
FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::int[], $5::int[], $6::text[],
            $7::text[], $8::bigint[], $9::bigint[])
     AS s(app_id, journey_id, user_id, visit, seq, node_id, output, enter_time, exit_time)
ON CONFLICT (app_id, journey_id, user_id, visit, seq) DO UPDATE SET
    output = excluded.output, exit_time = excluded.exit_time
"""


async def upsert_steps(conn: DBConnection, steps: Sequence[StepRow]) -> None:
    """Insert arrivals and close departures (one statement)."""
    if not steps:
        return
    await conn.execute(
        _UPSERT_STEPS,
        [s.app_id for s in steps],
        [s.journey_id for s in steps],
        [s.user_id for s in steps],
        [s.visit for s in steps],
        [s.seq for s in steps],
        [s.node_id for s in steps],
        [s.output for s in steps],
        micros(s.enter_time for s in steps),
        micros(s.exit_time for s in steps),
    )


_ROUTE_STEPS = """
unnest($1::int[], $2::text[], $3::text[], $4::boolean[]) AS r(step, node_id, output, closed)
"""

# A route applied to customers of one journey, all locked by the caller: their new state and
# the route's path rows, by offset from each one's current step (``old``: every sub-statement
# reads the rows as they were before this statement). The rows are found by the ``ctid`` the
# claim read under its lock (a TID scan: no index lookup, and no plan that scans the table
# because a thousand keys look costly to the planner).
_MOVE_ROUTED = f"""
WITH old AS (
    SELECT user_id, visit, seq, node_enter_time FROM instances
    WHERE ctid = ANY($7::tid[]) AND app_id = $5 AND journey_id = $6
), moved AS (
    UPDATE instances SET node_id = $8, status = $9, waiting_for = $10, wake_at = $11,
        pending_output = '', seq = seq + $12,
        node_enter_time = CASE WHEN $12 > 0 THEN $13 ELSE node_enter_time END,
        exit_time = COALESCE($14, exit_time)
    WHERE ctid = ANY($7::tid[]) AND app_id = $5 AND journey_id = $6
)
INSERT INTO path_steps (app_id, journey_id, user_id, visit, seq, node_id, output, enter_time,
                        exit_time)
SELECT $5, $6, o.user_id, o.visit, o.seq + r.step, r.node_id, r.output,
       CASE WHEN r.step = 0 THEN o.node_enter_time ELSE $13 END,
       CASE WHEN r.closed THEN $13::timestamptz END
FROM old o CROSS JOIN {_ROUTE_STEPS}
ON CONFLICT (app_id, journey_id, user_id, visit, seq) DO UPDATE SET
    output = excluded.output, exit_time = excluded.exit_time
"""


@dataclass(frozen=True, slots=True)
class RouteRows:
    """What a route writes, the same for every customer it moves (see ``routes.Route``)."""

    node_id: str
    status: str
    waiting_for: str
    wake_at: datetime | None
    offset: int
    steps: Sequence[tuple[int, str, str, bool]]

    def step_columns(self) -> list[list[Any]]:
        return [list(column) for column in zip(*self.steps, strict=True)]


async def move_routed(
    conn: DBConnection,
    app_id: str,
    journey_id: uuid.UUID,
    tids: Sequence[Any],
    rows: RouteRows,
    now: datetime,
) -> None:
    """Move customers of one journey along a route: their rows and path steps, one statement.

    ``tids`` are the ``ctid`` of rows the caller's claim locked and has not changed since
    (:attr:`Instance.tid`); only they travel (the rest is the route's, or read from the rows)."""
    if not tids:
        return
    result = await conn.execute(
        _MOVE_ROUTED,
        *rows.step_columns(),
        app_id,
        journey_id,
        list(tids),
        rows.node_id,
        rows.status,
        rows.waiting_for,
        rows.wake_at,
        rows.offset,
        now,
        now if rows.status == "exited" else None,
    )
    # Every locked row is where its tid says (the caller's lock keeps it there): a miss would be
    # a bug, and failing rolls the claim back rather than leave customers half moved.
    if int(result.split()[-1]) != len(tids) * len(rows.steps):
        raise RuntimeError(f"moved {result.split()[-1]} path rows, expected {len(tids)} x route")


_ENTER_ROUTED = f"""
WITH e AS (
    SELECT * FROM unnest($9::uuid[], $10::int[], $11::text[], $12::jsonb[])
        AS e(user_id, visit, trigger_id, props)
), entered AS (
    INSERT INTO instances (app_id, journey_id, user_id, visit, version, node_id, status,
                           waiting_for, wake_at, parked_wake_at, pending_output, seq,
                           enter_time, node_enter_time, exit_time, trigger_id,
                           trigger_properties, counts_for_reentry)
    SELECT $5, $6, e.user_id, e.visit, $7, $8, $13, $14, $15, NULL, '', 1 + $16, $17, $17,
           CASE WHEN $13 = 'exited' THEN $17::timestamptz END, e.trigger_id,
           COALESCE(e.props, '{{}}'::jsonb), true
    FROM e
    ON CONFLICT (app_id, journey_id, user_id) DO UPDATE SET
        visit = excluded.visit, version = excluded.version, node_id = excluded.node_id,
        status = excluded.status, waiting_for = excluded.waiting_for,
        wake_at = excluded.wake_at, parked_wake_at = NULL, pending_output = '',
        seq = excluded.seq, enter_time = excluded.enter_time,
        node_enter_time = excluded.node_enter_time, exit_time = excluded.exit_time,
        trigger_id = excluded.trigger_id, trigger_properties = excluded.trigger_properties,
        counts_for_reentry = true
)
INSERT INTO path_steps (app_id, journey_id, user_id, visit, seq, node_id, output, enter_time,
                        exit_time)
SELECT $5, $6, e.user_id, e.visit, 1 + r.step, r.node_id, r.output, $17,
       CASE WHEN r.closed THEN $17::timestamptz END
FROM e CROSS JOIN {_ROUTE_STEPS}
ON CONFLICT (app_id, journey_id, user_id, visit, seq) DO UPDATE SET
    output = excluded.output, exit_time = excluded.exit_time
"""


async def enter_routed(
    conn: DBConnection,
    app_id: str,
    journey_id: uuid.UUID,
    version: int,
    entered: Sequence[tuple[uuid.UUID, int, str, dict[str, Any]]],
    rows: RouteRows,
    at: datetime,
) -> None:
    """Put customers who just entered (``(user_id, visit, trigger_id, properties)``, at the
    start node at ``at``) where a route from the start node leads: rows and path, one statement."""
    if not entered:
        return
    await conn.execute(
        _ENTER_ROUTED,
        *rows.step_columns(),
        app_id,
        journey_id,
        version,
        rows.node_id,
        [e[0] for e in entered],
        [e[1] for e in entered],
        [e[2] for e in entered],
        [e[3] or None for e in entered],
        rows.status,
        rows.waiting_for,
        rows.wake_at,
        rows.offset,
        at,
    )


async def seen_triggers(
    conn: DBConnection, app_id: str, journey_id: uuid.UUID, pairs: Sequence[tuple[uuid.UUID, str]]
) -> set[tuple[uuid.UUID, str]]:
    """Which (user, trigger) pairs already tried to enter (a :data:`TRANSIENT_REFUSALS` row does
    not count: that trigger may still enter)."""
    if not pairs:
        return set()
    records = await conn.fetch(
        """
        SELECT e.user_id, e.trigger_id FROM entries e
        JOIN unnest($3::uuid[], $4::text[]) AS p(user_id, trigger_id)
          ON e.user_id = p.user_id AND e.trigger_id = p.trigger_id
        WHERE e.app_id = $1 AND e.journey_id = $2 AND e.outcome <> ALL($5::text[])
        """,
        app_id,
        journey_id,
        [p[0] for p in pairs],
        [p[1] for p in pairs],
        TRANSIENT_REFUSALS,
    )
    return {(r["user_id"], r["trigger_id"]) for r in records}


async def insert_entries(
    conn: DBConnection,
    app_id: str,
    journey_id: uuid.UUID,
    rows: Sequence[tuple[uuid.UUID, str, str]],
    at: datetime,
) -> set[tuple[uuid.UUID, str]]:
    """Record ``(user_id, trigger_id, outcome)`` attempts; returns the pairs recorded now (a
    concurrent twin of a pair loses).

    A pair last refused for a passing reason (:data:`TRANSIENT_REFUSALS`) is recorded again by
    its next attempt, which replaces the outcome: the refusal said "not now", so a retry of the
    same trigger (an AddCustomers retry, an audience page entered again) is not a duplicate, and
    the statistics keep one row per customer and trigger, with the latest outcome.
    """
    if not rows:
        return set()
    records = await conn.fetch(
        """
        INSERT INTO entries (app_id, journey_id, user_id, trigger_id, outcome, entry_time)
        SELECT $1, $2, r.user_id, r.trigger_id, r.outcome, $6
        FROM unnest($3::uuid[], $4::text[], $5::text[]) AS r(user_id, trigger_id, outcome)
        ON CONFLICT (app_id, journey_id, user_id, trigger_id) DO UPDATE
            SET outcome = excluded.outcome, entry_time = excluded.entry_time
            WHERE entries.outcome = ANY($7::text[])
        RETURNING user_id, trigger_id
        """,
        app_id,
        journey_id,
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        at,
        TRANSIENT_REFUSALS,
    )
    return {(r["user_id"], r["trigger_id"]) for r in records}


async def count_inside(conn: DBConnection, app_id: str, journey_id: uuid.UUID) -> int:
    """Customers inside a journey now."""
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM instances WHERE app_id = $1 AND journey_id = $2"
            " AND status IN ('active', 'waiting')",
            app_id,
            journey_id,
        )
    )


async def park(conn: DBConnection, app_id: str, journey_id: uuid.UUID) -> int:
    """Pause: hold every customer's wake time (restored by :func:`unpark`)."""
    result = await conn.execute(
        """
        UPDATE instances SET parked_wake_at = wake_at, wake_at = NULL
        WHERE app_id = $1 AND journey_id = $2 AND wake_at IS NOT NULL
        """,
        app_id,
        journey_id,
    )
    return int(result.split()[-1])


async def unpark(conn: DBConnection, app_id: str, journey_id: uuid.UUID) -> int:
    """Resume: what came due while paused is due now (late), the rest keeps its time."""
    result = await conn.execute(
        """
        UPDATE instances SET wake_at = parked_wake_at, parked_wake_at = NULL
        WHERE journey_id = $2 AND app_id = $1 AND parked_wake_at IS NOT NULL
        """,
        app_id,
        journey_id,
    )
    return int(result.split()[-1])


async def exit_all(
    conn: DBConnection, app_id: str, journey_id: uuid.UUID, output: str, at: datetime
) -> int:
    """Take every customer out (closing their open step with ``output``)."""
    await conn.execute(
        """
        UPDATE path_steps p SET output = $3, exit_time = $4
        FROM instances i
        WHERE i.app_id = $1 AND i.journey_id = $2 AND i.status IN ('active', 'waiting')
          AND p.app_id = i.app_id AND p.journey_id = i.journey_id AND p.user_id = i.user_id
          AND p.visit = i.visit AND p.seq = i.seq
        """,
        app_id,
        journey_id,
        output,
        at,
    )
    result = await conn.execute(
        """
        UPDATE instances SET status = 'exited', wake_at = NULL, parked_wake_at = NULL,
                             waiting_for = '', pending_output = '', exit_time = $3
        WHERE app_id = $1 AND journey_id = $2 AND status IN ('active', 'waiting')
        """,
        app_id,
        journey_id,
        at,
    )
    return int(result.split()[-1])


async def purge_user(conn: DBConnection, app_id: str, user_id: uuid.UUID) -> None:
    """Forget a user everywhere (GDPR erasure in identity)."""
    for table in (
        "instances",
        "path_steps",
        "entries",
        "send_receipts",
        "send_messages",
        "entry_timers",
    ):
        await conn.execute(
            f"DELETE FROM {table} WHERE app_id = $1 AND user_id = $2", app_id, user_id
        )
