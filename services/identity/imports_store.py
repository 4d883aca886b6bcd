"""SQL for imports: ``import_jobs``, ``import_rejections``, the staging table and the merge.

An import runs on a connection of its own (:func:`connect`), which holds the job's advisory lock
(:func:`try_lock`) and the session's temporary tables: ``import_staging`` (the checked rows,
each batch copied into ``import_batch`` and moved on with what a created user would get
computed while the next batch is read, see :class:`Staging`) and, inside the merge
transaction, ``import_plan`` (one row per staged row: which user it names, the new values, what
changed, or why it is refused), ``import_subs`` (subscriptions to create or move) and
``import_members``.

The merge is a fixed sequence of set-based statements, whatever the number of rows: no
statement per row, no row sent back to Python. Change facts are encoded as protobuf in SQL
(``pb_string`` and friends, migration 0007) and inserted into the outbox by ``INSERT ...
SELECT``. Statements are generated from the import's :class:`StagingLayout`; identifiers in
them are ours (``a3``, ``first_name``) or attribute names already checked against
``ATTRIBUTE_NAME_PATTERN``; every value from the file or the caller is a parameter.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from tidings.events.v1.identity_change_pb2 import IdentityChange

from services.identity import pii, suppressions
from services.identity.fields import ATTRIBUTE_NAME_PATTERN, CustomerField, FieldType
from services.identity.import_options import IdKind, Mode
from services.identity.import_rows import Rejection, StagedRow, StagingColumn, StagingLayout
from services.identity.subscriptions import MAX_SUBSCRIPTIONS_PER_USER
from services.identity.users import MAX_ATTRIBUTES
from services.runtime.db import DBConnection
from services.runtime.kafka import IDENTITY_CHANGES
from services.runtime.secrets_box import SecretBoxError

__all__ = [
    "STAGING",
    "ColumnVerdict",
    "ImportJob",
    "MergeCounts",
    "MergePlan",
    "attribute_columns_used",
    "connect",
    "copy_rejections",
    "copy_staging",
    "create_job",
    "create_members_table",
    "create_staging",
    "drop_staging",
    "fail_job",
    "fail_orphaned",
    "finish_job",
    "get_job",
    "insert_auto_fields",
    "list_jobs",
    "lock_existing_users",
    "merge",
    "record_progress",
    "rejections",
    "reseal_moved_rows",
    "running_jobs",
    "set_applying",
    "try_lock",
    "unlock",
]

#: The session's staging table (one import per connection).
STAGING = "import_staging"

_PUSH = "('ios_push', 'android_push', 'web_push')"


@dataclass(slots=True)
class ImportJob:
    """An ``import_jobs`` row.

    Attributes:
        options: The ImportOptions as their protobuf JSON mapping.
        state: ``receiving``, ``applying``, ``succeeded`` or ``failed``.
    """

    app_id: str
    import_id: str
    options: dict[str, Any]
    state: str
    bytes_received: int
    rows: int
    created: int
    updated: int
    unchanged: int
    rejected: int
    flagged_cells: int
    error: str
    segment_id: str
    create_time: datetime
    finish_time: datetime | None
    rejections: list[Rejection] = field(default_factory=list)


async def _init(conn: asyncpg.Connection) -> None:
    # The same JSON codecs as the service's pool (services.runtime.db), so store functions of
    # other modules (segments) behave the same on this connection.
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name, schema="pg_catalog", encoder=json.dumps, decoder=json.loads, format="text"
        )


async def connect(dsn: str) -> asyncpg.Connection:
    """A connection of the import's own, outside the pool (it is held for the whole upload).

    Its server process checks every second that the client is still there, so the merge of an
    import whose process died stops (and releases the job's lock) at once rather than running
    to its end first.
    """
    conn = await asyncpg.connect(dsn, server_settings={"client_connection_check_interval": "1000"})
    await _init(conn)
    return conn


# -- jobs ----------------------------------------------------------------------------------------

_JOB_COLUMNS = """
app_id, import_id, options, state, bytes_received, rows, created, updated, unchanged, rejected,
flagged_cells, error, segment_id, create_time, finish_time
"""


def _job(row: asyncpg.Record) -> ImportJob:
    return ImportJob(**{key: row[key] for key in row.keys()})  # noqa: SIM118


async def try_lock(conn: DBConnection, key: int) -> bool:
    """Take the session advisory lock ``key``; False if another session holds it."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))


async def unlock(conn: DBConnection, key: int) -> None:
    """Release the session advisory lock ``key``."""
    await conn.execute("SELECT pg_advisory_unlock($1)", key)


async def create_job(
    conn: DBConnection,
    app_id: str,
    import_id: str,
    options: dict[str, Any],
    lock_key: int,
    at: datetime,
) -> bool:
    """Record a new job, RECEIVING; False if the app has a job of that id already."""
    inserted = await conn.fetchval(
        """
        INSERT INTO import_jobs (app_id, import_id, options, state, lock_key, create_time)
        VALUES ($1, $2, $3, 'receiving', $4, $5)
        ON CONFLICT DO NOTHING
        RETURNING true
        """,
        app_id,
        import_id,
        options,
        lock_key,
        at,
    )
    return bool(inserted)


async def record_progress(
    conn: DBConnection,
    app_id: str,
    import_id: str,
    *,
    bytes_received: int,
    rows: int,
    rejected: int,
    flagged_cells: int,
) -> None:
    """Update a receiving job's counters (what GetImportJob shows while it runs)."""
    await conn.execute(
        """
        UPDATE import_jobs
        SET bytes_received = $3, rows = $4, rejected = $5, flagged_cells = $6
        WHERE app_id = $1 AND import_id = $2 AND state = 'receiving'
        """,
        app_id,
        import_id,
        bytes_received,
        rows,
        rejected,
        flagged_cells,
    )


async def set_applying(conn: DBConnection, app_id: str, import_id: str) -> None:
    """The file is in: the job goes APPLYING."""
    await conn.execute(
        "UPDATE import_jobs SET state = 'applying' WHERE app_id = $1 AND import_id = $2",
        app_id,
        import_id,
    )


async def fail_job(
    conn: DBConnection, app_id: str, import_id: str, error: str, at: datetime
) -> None:
    """Mark a running job FAILED (a finished one stays as it is)."""
    await conn.execute(
        """
        UPDATE import_jobs SET state = 'failed', error = $3, finish_time = $4
        WHERE app_id = $1 AND import_id = $2 AND state IN ('receiving', 'applying')
        """,
        app_id,
        import_id,
        error,
        at,
    )


async def finish_job(
    conn: DBConnection,
    app_id: str,
    import_id: str,
    *,
    counts: MergeCounts,
    bytes_received: int,
    rows: int,
    flagged_cells: int,
    segment_id: str,
    at: datetime,
) -> None:
    """Mark a job SUCCEEDED with its final counts (in the merge's transaction)."""
    await conn.execute(
        """
        UPDATE import_jobs
        SET state = 'succeeded', bytes_received = $3, rows = $4, created = $5, updated = $6,
            unchanged = $7, rejected = $8, flagged_cells = $9, segment_id = $10,
            finish_time = $11
        WHERE app_id = $1 AND import_id = $2
        """,
        app_id,
        import_id,
        bytes_received,
        rows,
        counts.created,
        counts.updated,
        counts.unchanged,
        counts.rejected,
        flagged_cells,
        segment_id,
        at,
    )


async def get_job(
    conn: DBConnection, app_id: str, import_id: str, *, with_rejections: int = 0
) -> ImportJob | None:
    """A job of the app, with its first ``with_rejections`` rejected rows."""
    row = await conn.fetchrow(
        f"SELECT {_JOB_COLUMNS} FROM import_jobs WHERE app_id = $1 AND import_id = $2",
        app_id,
        import_id,
    )
    if row is None:
        return None
    job = _job(row)
    if with_rejections:
        job.rejections = await rejections(
            conn, app_id, import_id, after_line=0, limit=with_rejections
        )
    return job


async def list_jobs(
    conn: DBConnection, app_id: str, *, after: tuple[datetime, str] | None, limit: int
) -> list[ImportJob]:
    """A page of an app's jobs, newest first, after ``(create_time, import_id)``."""
    after_time, after_id = after if after is not None else (None, None)
    rows = await conn.fetch(
        f"""
        SELECT {_JOB_COLUMNS} FROM import_jobs
        WHERE app_id = $1 AND ($2::timestamptz IS NULL OR (create_time, import_id) < ($2, $3))
        ORDER BY create_time DESC, import_id DESC
        LIMIT $4
        """,
        app_id,
        after_time,
        after_id,
        limit,
    )
    return [_job(row) for row in rows]


async def rejections(
    conn: DBConnection, app_id: str, import_id: str, *, after_line: int, limit: int
) -> list[Rejection]:
    """A job's rejected rows in line order, after line ``after_line``."""
    rows = await conn.fetch(
        """
        SELECT line, column_name, reason, message FROM import_rejections
        WHERE app_id = $1 AND import_id = $2 AND line > $3
        ORDER BY line
        LIMIT $4
        """,
        app_id,
        import_id,
        after_line,
        limit,
    )
    return [
        Rejection(row["line"], row["column_name"], row["reason"], row["message"]) for row in rows
    ]


async def running_jobs(conn: DBConnection) -> list[tuple[str, str, int]]:
    """``(app_id, import_id, lock_key)`` of every job still receiving or applying."""
    rows = await conn.fetch(
        """
        SELECT app_id, import_id, lock_key FROM import_jobs
        WHERE state IN ('receiving', 'applying')
        """
    )
    return [(row["app_id"], row["import_id"], row["lock_key"]) for row in rows]


async def fail_orphaned(
    conn: DBConnection, app_id: str, import_id: str, lock_key: int, error: str, at: datetime
) -> bool:
    """Mark a running job FAILED if no session holds its lock; True if it was.

    The lock is taken (and released) on ``conn`` for the check, so a job whose process is
    alive, or that starts right now, is never touched.
    """
    if not await try_lock(conn, lock_key):
        return False
    try:
        status = await conn.execute(
            """
            UPDATE import_jobs SET state = 'failed', error = $4, finish_time = $5
            WHERE app_id = $1 AND import_id = $2 AND lock_key = $3
              AND state IN ('receiving', 'applying')
            """,
            app_id,
            import_id,
            lock_key,
            error,
            at,
        )
    finally:
        await unlock(conn, lock_key)
    return status.endswith(" 1")


async def copy_rejections(
    conn: DBConnection, app_id: str, import_id: str, refused: Sequence[Rejection]
) -> None:
    """Store rejected rows (one ``COPY``)."""
    if refused:
        await conn.copy_records_to_table(
            "import_rejections",
            records=[(app_id, import_id, r.line, r.column, r.reason, r.message) for r in refused],
            columns=["app_id", "import_id", "line", "column_name", "reason", "message"],
        )


# -- staging -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Staging:
    """The staging table of one import and what its rows are prepared with.

    Rows arrive in batches (:func:`copy_staging`): each is copied into ``import_batch`` and
    moved into ``import_staging`` with the values a created user would get computed on the way
    (its attribute map, and its USER_CREATED fact but for the fields every fact of the import
    shares). That work runs while the next batch is read, on the database's core, so the merge
    (after the last byte) only decides and writes.

    Attributes:
        layout: The staged columns.
        id_kind: How keys name users (only EXTERNAL_ID and ALIAS rows create users).
        id_prefix: 24 hex digits; a created user's id is these and its line in 8 more (a
            time-ordered UUIDv7 per import, so a million inserts append to the index).
        event_prefix: 28 characters of a UUID; a fact's event id is these and its line.
        app_id: The app (PII values are sealed for it).
        alias_label: The label, for alias keys.
        sealed: Staging names of the attribute columns of PII fields: their cells are sealed
            before the COPY (as JSON text), for the user each row names, which is recorded in
            an extra ``sealed_for`` column (see :func:`copy_staging`).
        hash_keys: How many keyed hashes each subscription token is staged with (one per
            listed secret key, :mod:`~services.identity.suppressions`), in extra columns
            ``<column>_h<k>``: the merge finds suppressed tokens with them.
    """

    layout: StagingLayout
    id_kind: IdKind
    id_prefix: str
    event_prefix: str
    app_id: str = ""
    alias_label: str = ""
    sealed: frozenset[str] = frozenset()
    hash_keys: int = 0

    @classmethod
    def new(
        cls,
        layout: StagingLayout,
        id_kind: IdKind,
        id_prefix: str,
        *,
        app_id: str = "",
        alias_label: str = "",
        sealed: frozenset[str] = frozenset(),
    ) -> Staging:
        """A staging for ``layout`` with a fresh event-id prefix."""
        hash_keys = suppressions.key_count() if layout.subscriptions else 0
        event_prefix = str(uuid.uuid4())[:28]
        return cls(layout, id_kind, id_prefix, event_prefix, app_id, alias_label, sealed, hash_keys)

    def created_id(self, line: int) -> uuid.UUID:
        """The id a row creating a user gives it (as the merge computes it)."""
        return uuid.UUID(f"{self.id_prefix}{line:08x}")

    def hash_columns(self, column: StagingColumn) -> list[str]:
        """The columns holding the keyed hashes of a subscription column's tokens."""
        return [f"{column.name}_h{k}" for k in range(self.hash_keys)]

    @property
    def all_hash_columns(self) -> list[str]:
        """Every subscription column's hash columns, in the layout's order."""
        return [name for c in self.layout.subscriptions for name in self.hash_columns(c)]

    @property
    def column_names(self) -> list[str]:
        """The columns copied into ``import_batch``."""
        sealed_for = ["sealed_for"] if self.sealed else []
        return [*self.layout.names, *sealed_for, *self.all_hash_columns]


def _line_id(prefix: str, line: str) -> str:
    """SQL of the UUID (as text) made of a 24- or 28-character prefix and ``line`` in hex."""
    return f"({prefix} || lpad(to_hex({line}), 8, '0'))"


async def create_staging(conn: DBConnection, staging: Staging) -> None:
    """Create the session's staging tables (gone with the session)."""
    columns = ", ".join(
        f"{c.name} {'text' if c.name in staging.sealed else c.sql_type}"
        for c in staging.layout.columns
    )
    if staging.sealed:
        columns += ", sealed_for uuid"
    columns += "".join(f", {name} bytea" for name in staging.all_hash_columns)
    await conn.execute(
        f"""
        DROP TABLE IF EXISTS {STAGING}, import_batch;
        CREATE TEMP TABLE import_batch ({columns});
        CREATE TEMP TABLE {STAGING} ({columns}, attrs jsonb, created_fact bytea)
        """
    )


def _created_changes(layout: StagingLayout, row: str) -> list[tuple[str, str]]:
    """``(condition over the staged row, field name)`` of every field a created user gets:
    the fields :func:`_plan_sql` finds changed when the row names nobody."""
    changed = [
        (f"{row}.{c.name} IS NOT NULL", c.name)
        for c in layout.standard
        if not c.name.startswith("birth_")
    ]
    if any(c.name == "birth_month" for c in layout.standard):
        changed.append((f"{row}.birth_month IS NOT NULL", "birthdate"))
    changed += [
        (f"{row}.{c.name} IS NOT NULL", f"attributes.{c.attribute}") for c in layout.attributes
    ]
    return changed


def _changed_fields_sql(changed: Sequence[tuple[str, str]], params: _Params) -> str:
    """SQL of the change fact's repeated ``changed_fields`` (sorted, as BatchUpsertUsers
    publishes them) for ``(condition, field name)`` pairs: each name's bytes are a parameter."""
    return (
        " || ".join(
            f"CASE WHEN {condition} THEN "
            f"{params.add(IdentityChange(changed_fields=[name]).SerializeToString(), 'bytea')} "
            "ELSE '\\x'::bytea END"
            for condition, name in sorted(changed, key=lambda item: item[1])
        )
        or "'\\x'::bytea"
    )


def _prepare_sql(staging: Staging) -> tuple[str, list[object]]:
    """The statement moving ``import_batch`` into ``import_staging`` with the attribute map
    and the USER_CREATED fact (less its shared head) of each row, as if it created a user."""
    layout = staging.layout
    params = _Params()
    if layout.attributes:
        pairs = ", ".join(
            f"{_literal(c.attribute or '')}, "
            + (f"b.{c.name}::jsonb" if c.name in staging.sealed else f"b.{c.name}")
            for c in layout.attributes
        )
        attrs = f"jsonb_strip_nulls(jsonb_build_object({pairs}))"
    else:
        attrs = "NULL::jsonb"
    fact = "NULL::bytea"
    if staging.id_kind is not IdKind.USER_ID:
        changed = _created_changes(layout, "b")
        external_id = ""
        if staging.id_kind is IdKind.EXTERNAL_ID:
            changed.append(("true", "external_id"))
            external_id = "|| pb_string(6, b.key)"
        event_id = _line_id(params.add(staging.event_prefix), "b.line")
        user_id = _line_id(params.add(staging.id_prefix), "b.line") + "::uuid"
        fact = (
            f"{_uuid_field(1, event_id)} || {_uuid_field(3, user_id)} {external_id} "
            f"|| {_changed_fields_sql(changed, params)}"
        )
    sql = f"INSERT INTO {STAGING} SELECT b.*, {attrs}, {fact} FROM import_batch b"
    return sql, params.values


async def copy_staging(conn: DBConnection, staging: Staging, rows: Sequence[StagedRow]) -> None:
    """Append checked rows to the staging table (one ``COPY`` and one ``INSERT``).

    With PII columns, their cells are sealed first, for the user the row names now (one query
    for the batch's existing users) or creates; the merge re-seals the rare row whose user
    changed in between (:func:`reseal_moved_rows`).
    """
    if rows:
        if staging.sealed:
            rows = await _sealed_rows(conn, staging, rows)
        if staging.hash_keys:
            rows = _hashed_rows(staging, rows)
        await conn.copy_records_to_table("import_batch", records=rows, columns=staging.column_names)
        sql, params = _prepare_sql(staging)
        await conn.execute(sql, *params)
        await conn.execute("TRUNCATE import_batch")


async def _existing_users(
    conn: DBConnection, staging: Staging, keys: list[str]
) -> dict[str, uuid.UUID]:
    """The users the batch's keys name now, by key."""
    if staging.id_kind is IdKind.USER_ID:
        found: dict[str, uuid.UUID] = {}
        for key in keys:
            with contextlib.suppress(ValueError):
                found[key] = uuid.UUID(key)
        return found
    if staging.id_kind is IdKind.EXTERNAL_ID:
        rows = await conn.fetch(
            "SELECT external_id AS key, user_id FROM users"
            " WHERE app_id = $1 AND external_id = ANY($2::text[])",
            staging.app_id,
            keys,
        )
    else:
        rows = await conn.fetch(
            "SELECT value AS key, user_id FROM user_aliases"
            " WHERE app_id = $1 AND label = $2 AND value = ANY($3::text[])",
            staging.app_id,
            staging.alias_label,
            keys,
        )
    return {row["key"]: row["user_id"] for row in rows}


async def _sealed_rows(
    conn: DBConnection, staging: Staging, rows: Sequence[StagedRow]
) -> list[StagedRow]:
    """``rows`` with their PII cells sealed and the user they are sealed for appended."""
    names = staging.layout.names
    positions = [(names.index(name), name) for name in staging.sealed]
    attribute_of = {c.name: c.attribute or "" for c in staging.layout.attributes}
    existing = await _existing_users(conn, staging, [str(row[1]) for row in rows])
    box = pii.box()
    app_id = staging.app_id
    sealed_rows: list[StagedRow] = []
    for row in rows:
        user_id = existing.get(str(row[1]))
        if user_id is None:
            user_id = staging.created_id(int(row[0]))  # type: ignore[call-overload]
        cells = list(row)
        prefix = pii.context(app_id, user_id, "")
        for index, name in positions:
            value = cells[index]
            if value is not None:
                # As JSON text (COPY has no binary jsonb encoder); cast while preparing.
                cells[index] = box.seal_json(value, prefix + attribute_of[name])
        cells.append(user_id)
        sealed_rows.append(tuple(cells))
    return sealed_rows


def _hashed_rows(staging: Staging, rows: Sequence[StagedRow]) -> list[StagedRow]:
    """``rows`` with the keyed hashes of their subscription tokens appended (in Python, while
    the file streams: the key never reaches the database)."""
    names = staging.layout.names
    hashers = [
        (names.index(c.name), suppressions.Hasher(staging.app_id, c.subscription.value))
        for c in staging.layout.subscriptions
        if c.subscription is not None
    ]
    empty = [None] * staging.hash_keys
    hashed: list[StagedRow] = []
    for row in rows:
        extra: list[object] = []
        for index, hasher in hashers:
            token = row[index]
            extra += empty if token is None else hasher.all(str(token))
        hashed.append((*row, *extra))
    return hashed


async def drop_staging(conn: DBConnection) -> None:
    """Drop the staging table."""
    await conn.execute(f"DROP TABLE IF EXISTS {STAGING}")


async def attribute_columns_used(conn: DBConnection, layout: StagingLayout) -> set[str]:
    """Names of the staging's attribute columns that hold at least one value."""
    columns = [c for c in layout.attributes]
    if not columns:
        return set()
    checks = ", ".join(f"bool_or({c.name} IS NOT NULL) AS {c.name}" for c in columns)
    row = await conn.fetchrow(f"SELECT {checks} FROM {STAGING} WHERE ok")
    return {c.name for c in columns if row is not None and row[c.name]}


async def insert_auto_fields(
    conn: DBConnection, app_id: str, fields: Sequence[CustomerField], at: datetime
) -> None:
    """Define fields automatically; a name defined meanwhile keeps its definition."""
    if fields:
        await conn.execute(
            """
            INSERT INTO customer_fields (app_id, name, type, auto_defined, create_time)
            SELECT $1, name, type, true, $4 FROM unnest($2::text[], $3::text[]) AS f(name, type)
            ON CONFLICT DO NOTHING
            """,
            app_id,
            [f.name for f in fields],
            [f.type.value for f in fields],
            at,
        )


# -- the merge -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ColumnVerdict:
    """Why an attribute column's values cannot be written: its customer field's type differs,
    or it is undefined and the app refuses undefined fields."""

    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class MergePlan:
    """What the merge needs to know besides the staged rows.

    Attributes:
        app_id: The app.
        import_id: The job.
        alias_label: The label, for alias keys.
        mode: Which rows may create / update.
        clear: Whether empty cells clear.
        verdicts: Attribute columns (by staging name) whose values are refused.
        staging: The staging table (its layout, and the ids it gave created users).
        at: The time of the import.
    """

    app_id: str
    import_id: str
    staging: Staging
    alias_label: str
    mode: Mode
    clear: bool
    verdicts: dict[str, ColumnVerdict]
    at: datetime

    @property
    def layout(self) -> StagingLayout:
        """The staged columns."""
        return self.staging.layout

    @property
    def id_kind(self) -> IdKind:
        """How keys name users."""
        return self.staging.id_kind


@dataclass(frozen=True, slots=True)
class MergeCounts:
    """Outcome of the staged rows (rows refused while reading are not among them)."""

    created: int
    updated: int
    unchanged: int
    rejected: int


class MergeConflict(Exception):
    """A concurrent write won a race on one of the import's keys: run the merge again."""


class _Params:
    """Positional parameters of a generated statement."""

    def __init__(self, *initial: object) -> None:
        self.values: list[object] = list(initial)

    def add(self, value: object, cast: str = "text") -> str:
        self.values.append(value)
        return f"${len(self.values)}::{cast}"


def _literal(name: str) -> str:
    # Attribute names are lowercase letters, digits and '_' (checked with the options).
    assert ATTRIBUTE_NAME_PATTERN.fullmatch(name), name
    return f"'{name}'"


def _lookup(plan: MergePlan, params: _Params) -> str:
    """FROM/JOIN clause binding ``u`` to the user each first-of-its-key staged row names."""
    first = "r.ok AND r.n = 1"
    if plan.id_kind is IdKind.EXTERNAL_ID:
        return f"LEFT JOIN users u ON {first} AND u.app_id = $1 AND u.external_id = r.key"
    if plan.id_kind is IdKind.USER_ID:
        return f"LEFT JOIN users u ON {first} AND u.app_id = $1 AND u.user_id = r.key::uuid"
    label = params.add(plan.alias_label)
    return f"""
        LEFT JOIN user_aliases a ON {first} AND a.app_id = $1 AND a.label = {label}
            AND a.value = r.key
        LEFT JOIN users u ON u.app_id = $1 AND u.user_id = a.user_id
    """


async def lock_existing_users(conn: DBConnection, plan: MergePlan) -> None:
    """Lock (``FOR UPDATE``, in id order) every user a staged row names, so the plan reads
    values nobody changes before the merge commits."""
    params = _Params(plan.app_id)
    if plan.id_kind is IdKind.EXTERNAL_ID:
        which = f"u.external_id IN (SELECT key FROM {STAGING} WHERE ok)"
    elif plan.id_kind is IdKind.USER_ID:
        which = f"u.user_id IN (SELECT key::uuid FROM {STAGING} WHERE ok)"
    else:
        label = params.add(plan.alias_label)
        which = f"""u.user_id IN (
            SELECT a.user_id FROM user_aliases a JOIN {STAGING} s
            ON a.app_id = $1 AND a.label = {label} AND a.value = s.key WHERE s.ok)"""
    await conn.execute(
        f"""
        SELECT count(*) FROM (
            SELECT 1 FROM users u WHERE u.app_id = $1 AND {which}
            ORDER BY u.user_id FOR UPDATE
        ) AS locked
        """,
        *params.values,
    )


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the merge refuses a row: when (SQL over the row ``r``, its user ``u`` and its new
    values ``v``), and what the rejection says (``{first_line}`` in the message is the line
    that has the same id)."""

    condition: str
    reason: str
    column: str
    message: str


#: The refusal number of rows over the cap of non-push subscriptions (set after the plan).
_SUBSCRIPTION_LIMIT = 0


def _refusals_sql(plan: MergePlan, checks: Sequence[Refusal]) -> tuple[str, list[object]]:
    """The statement storing the rejections of the plan's refused rows."""
    params = _Params(plan.app_id, plan.import_id)
    limit = MAX_SUBSCRIPTIONS_PER_USER
    every = [
        *enumerate(checks, 1),
        (
            _SUBSCRIPTION_LIMIT,
            Refusal(
                "",
                "SUBSCRIPTION_LIMIT_REACHED",
                "",
                f"the user would hold more than {limit} subscriptions that are not push tokens "
                "(only push subscriptions are evicted to make room)",
            ),
        ),
    ]

    def pick(field: str) -> str:
        branches = []
        for number, check in every:
            text = getattr(check, field)
            if "{first_line}" in text:
                before, _, after = text.partition("{first_line}")
                value = f"{params.add(before)} || p.first_line || {params.add(after)}"
            else:
                value = params.add(text)
            branches.append(f"WHEN {number} THEN {value}")
        return f"CASE p.refusal {' '.join(branches)} END"

    sql = f"""
        INSERT INTO import_rejections (app_id, import_id, line, column_name, reason, message)
        SELECT $1, $2, p.line, {pick("column")}, {pick("reason")}, {pick("message")}
        FROM import_plan p WHERE p.refusal IS NOT NULL
    """
    return sql, params.values


def _plan_sql(plan: MergePlan) -> tuple[str, list[object], list[Refusal]]:
    """The statement creating ``import_plan``: one row per staged row with its user, its new
    values, the fields that change, and why it is refused (NULL when it is not)."""
    params = _Params(plan.app_id, plan.staging.id_prefix)
    layout = plan.layout
    new_values: list[tuple[str, str]] = []  # (expression, name)
    changed: list[tuple[str, str]] = []  # (condition, field name)
    for column in layout.standard:
        name = column.name
        if plan.clear:
            expr = f"r.{name}"
        elif name.startswith("birth_"):
            # The three parts go together: an unknown year is NULL but still a new value.
            expr = f"CASE WHEN r.birth_month IS NULL THEN u.{name} ELSE r.{name} END"
        else:
            expr = f"coalesce(r.{name}, u.{name})"
        new_values.append((expr, name))
        if not name.startswith("birth_"):
            changed.append((f"v.{name} IS DISTINCT FROM u.{name}", name))
    if any(c.name == "birth_month" for c in layout.standard):
        changed.append(
            (
                "(v.birth_year, v.birth_month, v.birth_day) IS DISTINCT FROM "
                "(u.birth_year, u.birth_month, u.birth_day)",
                "birthdate",
            )
        )
    attributes = layout.attributes
    if attributes:
        # The row's attribute map, built while staging (a refused column's values are in it,
        # but a row holding one is refused: the rows written are the same).
        base = "coalesce(u.attributes, '{}'::jsonb)"
        if plan.clear:
            names = ", ".join(_literal(c.attribute or "") for c in attributes)
            base = f"({base} - ARRAY[{names}]::text[])"
        new_values.append(
            (f"CASE WHEN u.user_id IS NULL THEN r.attrs ELSE {base} || r.attrs END", "attributes")
        )
        for c in attributes:
            key = _literal(c.attribute or "")
            changed.append(
                (
                    f"v.attributes -> {key} IS DISTINCT FROM u.attributes -> {key}",
                    f"attributes.{c.attribute}",
                )
            )
    else:
        new_values.append(("u.attributes", "attributes"))
    if plan.id_kind is IdKind.EXTERNAL_ID:
        changed.append(("u.user_id IS NULL", "external_id"))
    # The changed fields of a row naming a user: a created user's fact was encoded while
    # staging (``created_fact``).
    changed_expr = (
        "CASE WHEN u.user_id IS NULL THEN '\\x'::bytea "
        f"ELSE {_changed_fields_sql(changed, params)} END"
    )

    # Why a row is refused, in order: the first that holds wins. The plan keeps only the
    # number of the check (cheap per row); reason, column and message are filled in for the
    # refused rows alone (:func:`_refusals_sql`).
    checks: list[Refusal] = [
        Refusal("r.n > 1", "DUPLICATE_ID", "", "line {first_line} has this id already"),
    ]
    if plan.id_kind is IdKind.USER_ID or plan.mode is Mode.UPDATE_ONLY:
        checks.append(Refusal("u.user_id IS NULL", "USER_NOT_FOUND", "", "no user has this id"))
    if plan.mode is Mode.CREATE_ONLY:
        checks.append(
            Refusal(
                "u.user_id IS NOT NULL",
                "USER_EXISTS",
                "",
                "a user has this id already (the import only creates users)",
            )
        )
    for c in attributes:
        verdict = plan.verdicts.get(c.name)
        if verdict is not None:
            checks.append(
                Refusal(f"r.{c.name} IS NOT NULL", verdict.reason, c.header, verdict.message)
            )
    if attributes:
        # Only a user who had attributes can pass the cap: the import adds at most one per
        # attribute column (and options allow fewer columns than the cap).
        keys_of = "(SELECT count(*) FROM jsonb_object_keys({}))"
        new_count = keys_of.format("v.attributes")
        old_count = keys_of.format("u.attributes")
        checks.append(
            Refusal(
                f"u.user_id IS NOT NULL AND {old_count} > {MAX_ATTRIBUTES - len(attributes)} "
                f"AND {new_count} > {MAX_ATTRIBUTES} AND {new_count} > {old_count}",
                "ATTRIBUTE_LIMIT",
                "",
                f"a user may hold at most {MAX_ATTRIBUTES} custom attributes",
            )
        )
    branches = " ".join(f"WHEN {check.condition} THEN {n}" for n, check in enumerate(checks, 1))
    refusal = f"CASE WHEN NOT r.ok THEN NULL {branches} END"

    external_id = "r.key" if plan.id_kind is IdKind.EXTERNAL_ID else "u.external_id"
    # Of the staged values only the row's identity and its subscription tokens are needed
    # later (the rest is in the new_* columns): a narrower table is cheaper to write.
    kept = [
        "line",
        "key",
        "ok",
        "n",
        "first_line",
        "created_fact",
        *(c.name for c in layout.subscriptions),
        *(["sealed_for"] if plan.staging.sealed else []),
        *plan.staging.all_hash_columns,
    ]
    sql = f"""
        CREATE TEMP TABLE import_plan ON COMMIT DROP AS
        SELECT {", ".join(f"r.{name}" for name in kept)}, u.user_id AS existing_id,
            coalesce(u.user_id, ($2 || lpad(to_hex(r.line), 8, '0'))::uuid) AS user_id,
            {external_id} AS external_id,
            {", ".join(f"v.{name} AS new_{name}" for _, name in new_values)},
            {changed_expr} AS changed_pb,
            {refusal}::int2 AS refusal
        FROM (
            -- n: 1 for the first row of its key, 2 for a later one (import_duplicates).
            SELECT s.*, CASE WHEN s.line > d.first_line THEN 2 ELSE 1 END AS n, d.first_line
            FROM {STAGING} s LEFT JOIN import_duplicates d ON d.key = s.key
        ) AS r
        {_lookup(plan, params)}
        CROSS JOIN LATERAL (
            -- OFFSET 0 keeps the planner from copying these expressions into every place
            -- that uses them (the attribute map is used half a dozen times).
            SELECT {", ".join(f"{expr} AS {name}" for expr, name in new_values)}
            OFFSET 0
        ) AS v
    """
    return sql, params.values, checks


async def merge(conn: DBConnection, plan: MergePlan, *, dry_run: bool = False) -> MergeCounts:
    """Apply the staged rows: users, aliases, subscriptions, rejections and change facts.

    Call inside a transaction, after :func:`lock_existing_users`. With ``dry_run`` the writes
    run inside a savepoint that is then rolled back: the counts and the stored rejections are
    the import's, and nothing else remains.

    Raises:
        MergeConflict: A concurrent transaction created an external id, alias or subscription
            the import was about to create; roll back and merge again.
    """
    # Bulk work: sorts and hashes in memory (Postgres's, for this transaction only); and no JIT:
    # compiling these wide generated statements costs a second or more each, more than it saves.
    await conn.execute("SET LOCAL work_mem = '128MB'; SET LOCAL jit = off")
    # Keys that more than one row names, with their first line: few, so the plan finds a
    # row's duplicates with a hash look-up instead of sorting every row by key.
    await conn.execute(
        f"""
        CREATE TEMP TABLE import_duplicates ON COMMIT DROP AS
        SELECT key, min(line) AS first_line FROM {STAGING} GROUP BY key HAVING count(*) > 1;
        ANALYZE import_duplicates
        """
    )
    sql, params, checks = _plan_sql(plan)
    await conn.execute(sql, *params)
    if plan.layout.subscriptions:
        await _refuse_over_subscription_limit(conn, plan)
    sql, params = _refusals_sql(plan, checks)
    await conn.execute(sql, *params)
    expected = await conn.fetchrow(
        """
        SELECT count(*) FILTER (WHERE existing_id IS NULL) AS created,
               count(*) FILTER (WHERE existing_id IS NOT NULL AND octet_length(changed_pb) > 0)
                   AS updated
        FROM import_plan WHERE ok AND refusal IS NULL
        """
    )
    assert expected is not None
    if not dry_run:
        return await _write(conn, plan, expected["created"], expected["updated"])
    try:
        # A savepoint: the counts come from the real writes, which are then undone.
        async with conn.transaction():
            raise _Previewed(await _write(conn, plan, expected["created"], expected["updated"]))
    except _Previewed as previewed:
        return previewed.counts


class _Previewed(Exception):
    """Rolls a dry run's writes back to their savepoint, carrying what they counted."""

    def __init__(self, counts: MergeCounts) -> None:
        super().__init__("dry run")
        self.counts = counts


async def _write(conn: DBConnection, plan: MergePlan, created: int, updated: int) -> MergeCounts:
    """The merge's writes (users, subscriptions, facts, segment marks) and its counts."""
    await _insert_users(conn, plan, created)
    await _update_users(conn, plan, updated)
    if plan.staging.sealed:
        await reseal_moved_rows(conn, plan)
    await _publish_user_facts(conn, plan)
    subscribed = "false"
    if plan.layout.subscriptions:
        await _merge_subscriptions(conn, plan)
        subscribed = "p.user_id IN (SELECT user_id FROM import_subs WHERE moved_in)"
    await _mark_for_segments(conn, plan, subscribed)
    counts = await conn.fetchrow(
        f"""
        SELECT count(*) FILTER (WHERE p.refusal IS NOT NULL) AS rejected,
               count(*) FILTER (WHERE p.refusal IS NULL AND p.existing_id IS NULL) AS created,
               count(*) FILTER (WHERE p.refusal IS NULL AND p.existing_id IS NOT NULL
                                AND (octet_length(p.changed_pb) > 0 OR {subscribed})) AS updated,
               count(*) FILTER (WHERE p.refusal IS NULL AND p.existing_id IS NOT NULL
                                AND NOT (octet_length(p.changed_pb) > 0 OR {subscribed}))
                   AS unchanged
        FROM import_plan p WHERE p.ok
        """
    )
    assert counts is not None
    return MergeCounts(
        created=counts["created"],
        updated=counts["updated"],
        unchanged=counts["unchanged"],
        rejected=counts["rejected"],
    )


async def _insert_users(conn: DBConnection, plan: MergePlan, expected: int) -> None:
    if not expected:
        return
    names = [c.name for c in plan.layout.standard]
    columns = ", ".join(["external_id", *names, "attributes"])
    external_id = "p.key" if plan.id_kind is IdKind.EXTERNAL_ID else "NULL"
    values = ", ".join(
        [external_id, *(f"p.new_{n}" for n in names), "coalesce(p.new_attributes, '{}')"]
    )
    # Plain INSERTs (no ON CONFLICT, whose speculative insertion costs a good deal per row):
    # a key taken by a concurrent writer since the plan fails the statement, and the caller
    # runs the merge again (_unique).
    async with _unique("a user the import creates was created meanwhile"):
        await conn.execute(
            f"""
            INSERT INTO users (app_id, user_id, {columns}, create_time, update_time)
            SELECT $1, p.user_id, {values}, $2, $2
            FROM import_plan p WHERE p.ok AND p.refusal IS NULL AND p.existing_id IS NULL
            """,
            plan.app_id,
            plan.at,
        )
    if plan.id_kind is IdKind.ALIAS:
        async with _unique("an alias the import creates was taken meanwhile"):
            await conn.execute(
                """
                INSERT INTO user_aliases (app_id, label, value, user_id, create_time)
                SELECT $1, $2, p.key, p.user_id, $3
                FROM import_plan p WHERE p.ok AND p.refusal IS NULL AND p.existing_id IS NULL
                """,
                plan.app_id,
                plan.alias_label,
                plan.at,
            )


@contextlib.asynccontextmanager
async def _unique(what: str) -> AsyncIterator[None]:
    """Turn a unique violation into :class:`MergeConflict` (the transaction is lost anyway)."""
    try:
        yield
    except asyncpg.UniqueViolationError as exc:
        raise MergeConflict(what) from exc


async def _update_users(conn: DBConnection, plan: MergePlan, expected: int) -> None:
    if not expected:
        return
    names = [c.name for c in plan.layout.standard]
    sets = ", ".join([*(f"{n} = p.new_{n}" for n in names), "attributes = p.new_attributes"])
    status = await conn.execute(
        f"""
        UPDATE users u SET {sets}, update_time = $2
        FROM import_plan p
        WHERE u.app_id = $1 AND u.user_id = p.existing_id
          AND p.ok AND p.refusal IS NULL AND octet_length(p.changed_pb) > 0
        """,
        plan.app_id,
        plan.at,
    )
    if int(status.rsplit(" ", 1)[-1]) != expected:
        raise MergeConflict("a user the import updates was deleted meanwhile")


async def reseal_moved_rows(conn: DBConnection, plan: MergePlan) -> int:
    """Re-seal the PII cells of rows whose user is not the one they were sealed for while
    staging (a user created, deleted or given the row's key meanwhile): a sealed value opens
    only for its user. Returns how many users were fixed (almost always none)."""
    names = [c.attribute or "" for c in plan.layout.attributes if c.name in plan.staging.sealed]
    rows = await conn.fetch(
        """
        SELECT p.user_id, p.sealed_for, u.attributes FROM import_plan p
        JOIN users u ON u.app_id = $1 AND u.user_id = p.user_id
        WHERE p.ok AND p.refusal IS NULL AND p.sealed_for IS DISTINCT FROM p.user_id
        """,
        plan.app_id,
    )
    box = pii.box()
    fixed = 0
    for row in rows:
        fresh = {}
        for name in names:
            value = row["attributes"].get(name)
            if not pii.is_sealed(value) or row["sealed_for"] is None:
                continue
            try:
                plain = box.open_value(value, pii.context(plan.app_id, row["sealed_for"], name))
            except SecretBoxError:
                continue  # the user's own value (the row left this cell empty)
            fresh[name] = box.seal_value(plain, pii.context(plan.app_id, row["user_id"], name))
        if fresh:
            await conn.execute(
                "UPDATE users SET attributes = attributes || $3::jsonb"
                " WHERE app_id = $1 AND user_id = $2",
                plan.app_id,
                row["user_id"],
                fresh,
            )
            fixed += 1
    return fixed


async def _mark_for_segments(conn: DBConnection, plan: MergePlan, subscribed: str) -> None:
    """Queue every user the import changed for segment re-evaluation, as ``changes.publish``
    does for every other write (``segments_store.mark_dirty``): one INSERT ... SELECT into
    its queue instead of a million ids through Python."""
    holders = (
        "UNION SELECT holder FROM import_subs WHERE moved_in AND holder IS NOT NULL"
        if plan.layout.subscriptions
        else ""
    )
    await conn.execute(
        f"""
        INSERT INTO segment_dirty_users (app_id, user_id)
        SELECT $1, touched.user_id FROM (
            SELECT p.user_id FROM import_plan p
            WHERE p.ok AND p.refusal IS NULL
              AND (p.existing_id IS NULL OR octet_length(p.changed_pb) > 0 OR {subscribed})
            {holders}
        ) AS touched
        """,
        plan.app_id,
    )


def _fact_head(plan: MergePlan, kind: IdentityChange.Kind.ValueType) -> bytes:
    """The encoded fields every fact of one kind of this import shares (app, kind, time)."""
    fact = IdentityChange(app_id=plan.app_id, kind=kind)
    fact.occurred_at.FromDatetime(plan.at)
    return fact.SerializeToString()


_OUTBOX_INSERT = "INSERT INTO outbox (topic, key, event_type, payload)"


def _uuid_field(number: int, expr: str) -> str:
    """SQL encoding a UUID (36 characters as text) as string field ``number`` (< 16)."""
    return f"'\\x{number << 3 | 2:02x}24'::bytea || convert_to(({expr})::text, 'UTF8')"


#: The event id every fact carries (field 1), a fresh random UUID per row.
_EVENT_ID = _uuid_field(1, "gen_random_uuid()")


async def _publish_user_facts(conn: DBConnection, plan: MergePlan) -> None:
    # A created user's fact was encoded while staging but for its head (app, kind, time).
    # Not sorted: each user has one fact (Kafka orders a key's facts, not users'), and the
    # plan is read in the staging's order anyway.
    await conn.execute(
        f"""
        {_OUTBOX_INSERT}
        SELECT $1, p.user_id::text, $2,
            CASE WHEN p.existing_id IS NULL THEN $3::bytea || p.created_fact
            ELSE $4::bytea
                || {_uuid_field(1, _line_id("$5::text", "p.line"))}
                || {_uuid_field(3, "p.user_id")} || pb_string(6, p.external_id) || p.changed_pb
            END
        FROM import_plan p
        WHERE p.ok AND p.refusal IS NULL
          AND (p.existing_id IS NULL OR octet_length(p.changed_pb) > 0)
        """,
        IDENTITY_CHANGES.name,
        IDENTITY_CHANGES.event_type,
        _fact_head(plan, IdentityChange.Kind.KIND_USER_CREATED),
        _fact_head(plan, IdentityChange.Kind.KIND_USER_UPDATED),
        plan.staging.event_prefix,
    )


def _token_values(staging: Staging, params: _Params) -> str:
    """``VALUES`` rows ``(type, token, hashes)`` of a plan row ``p``'s subscription columns."""
    rows = []
    for column in staging.layout.subscriptions:
        assert column.subscription is not None
        hashes = ", ".join(f"p.{name}" for name in staging.hash_columns(column))
        rows.append(
            f"({params.add(column.subscription.value)}, p.{column.name}, ARRAY[{hashes}]::bytea[])"
        )
    return ", ".join(rows)


async def _refuse_over_subscription_limit(conn: DBConnection, plan: MergePlan) -> None:
    """Refuse rows that would give an existing user more than the cap of non-push
    subscriptions (only push subscriptions are evicted to make room)."""
    params = _Params(plan.app_id)
    tokens = _token_values(plan.staging, params)
    limit = MAX_SUBSCRIPTIONS_PER_USER
    await conn.execute(
        f"""
        UPDATE import_plan p
        SET refusal = {_SUBSCRIPTION_LIMIT}
        WHERE p.ok AND p.refusal IS NULL AND p.existing_id IS NOT NULL
          AND (SELECT count(*) FROM subscriptions s
               WHERE s.app_id = $1 AND s.user_id = p.existing_id AND s.type NOT IN {_PUSH})
            + (SELECT count(*) FROM (VALUES {tokens}) AS t(type, token, hashes)
               WHERE t.token IS NOT NULL AND t.type NOT IN {_PUSH}
                 AND NOT EXISTS (SELECT 1 FROM subscriptions s
                                 WHERE s.app_id = $1 AND s.type = t.type AND s.token = t.token
                                   AND s.user_id = p.existing_id)) > {limit}
        """,
        *params.values,
    )


async def _merge_subscriptions(conn: DBConnection, plan: MergePlan) -> None:
    """Create the subscriptions the file names, move those another user holds, evict push
    subscriptions past the cap, and publish what changed.

    The first row (in file order) naming a token gets it. An existing subscription keeps its
    consent: one whose owner unsubscribed stays unsubscribed. A created one whose token is
    suppressed (its owner opted out, then the subscription was deleted) is created
    unsubscribed, and consumes the suppression.
    """
    params = _Params(plan.app_id)
    tokens = _token_values(plan.staging, params)
    await conn.execute(
        f"""
        CREATE TEMP TABLE import_subs ON COMMIT DROP AS
        SELECT DISTINCT ON (t.type, t.token)
            p.line, p.user_id, p.existing_id IS NOT NULL AS user_existed, t.type, t.token,
            s.subscription_id AS existing_sub, s.user_id AS holder,
            s.user_id IS DISTINCT FROM p.user_id AS moved_in, t.hashes,
            s.subscription_id IS NULL AND EXISTS (
                SELECT 1 FROM suppressions x
                WHERE x.app_id = $1 AND x.type = t.type AND x.token_hash = ANY(t.hashes)
            ) AS suppressed
        FROM import_plan p
        CROSS JOIN LATERAL (VALUES {tokens}) AS t(type, token, hashes)
        -- One unique-index probe per token, whatever the statistics say: a plain join was
        -- planned as a nested loop over every subscription of the app when the stats were
        -- stale (right after an earlier import), minutes for 100k rows.
        LEFT JOIN LATERAL (
            SELECT s.subscription_id, s.user_id FROM subscriptions s
            WHERE s.app_id = $1 AND s.type = t.type AND s.token = t.token
            OFFSET 0
        ) AS s ON true
        WHERE p.ok AND p.refusal IS NULL AND t.token IS NOT NULL
        ORDER BY t.type, t.token, p.line
        """,
        *params.values,
    )
    # Moves: lock the holders, then the subscriptions (the subscriptions' locking order), and
    # make sure nothing moved before the locks were taken.
    await conn.execute(
        """
        SELECT count(*) FROM (
            SELECT 1 FROM users WHERE app_id = $1 AND user_id IN (
                SELECT holder FROM import_subs WHERE holder IS NOT NULL AND moved_in)
            ORDER BY user_id FOR UPDATE
        ) AS holders
        """,
        plan.app_id,
    )
    stale = await conn.fetchval(
        """
        SELECT count(*) FROM (
            SELECT s.user_id, i.holder FROM subscriptions s
            JOIN import_subs i ON s.app_id = $1 AND s.subscription_id = i.existing_sub
            WHERE i.moved_in
            FOR UPDATE OF s
        ) AS locked WHERE user_id <> holder
        """,
        plan.app_id,
    )
    if stale:
        raise MergeConflict("a subscription the import moves moved meanwhile")
    reachable = "(s.enabled AND s.opt_in = 'subscribed')"
    sub_fields = (
        f"{_uuid_field(9, 's.subscription_id')} || pb_string(10, s.type) || "
        f"CASE WHEN {reachable} THEN '\\x5801'::bytea ELSE '\\x'::bytea END"
    )
    removed = _fact_head(plan, IdentityChange.Kind.KIND_SUBSCRIPTION_REMOVED)
    changed = _fact_head(plan, IdentityChange.Kind.KIND_SUBSCRIPTION_CHANGED)
    created = _fact_head(plan, IdentityChange.Kind.KIND_SUBSCRIPTION_CREATED)
    await conn.execute(
        f"""
        WITH moved AS (
            UPDATE subscriptions s SET user_id = i.user_id, update_time = $2
            FROM import_subs i
            WHERE s.app_id = $1 AND s.subscription_id = i.existing_sub AND i.moved_in
            RETURNING s.*, i.holder, i.line
        )
        {_OUTBOX_INSERT}
        SELECT $3, f.key, $4, f.payload FROM (
            SELECT s.line, 0 AS step, s.holder::text AS key,
                $5::bytea || {_EVENT_ID} || {_uuid_field(3, "s.holder")}
                || {sub_fields} AS payload
            FROM moved s
            UNION ALL
            SELECT s.line, 1, s.user_id::text,
                $6::bytea || {_EVENT_ID} || {_uuid_field(3, "s.user_id")}
                || pb_string(7, 'user_id') || {sub_fields}
            FROM moved s
        ) AS f
        ORDER BY f.line, f.step
        """,
        plan.app_id,
        plan.at,
        IDENTITY_CHANGES.name,
        IDENTITY_CHANGES.event_type,
        removed,
        changed,
    )
    async with _unique("a subscription the import creates was registered meanwhile"):
        await conn.execute(
            f"""
            WITH inserted AS (
                INSERT INTO subscriptions (app_id, subscription_id, user_id, type, token,
                    opt_in, opt_in_reason, opt_in_change_time, last_active_time, token_time,
                    create_time, update_time)
                SELECT $1, gen_random_uuid(), i.user_id, i.type, i.token,
                    CASE WHEN i.suppressed THEN 'unsubscribed' ELSE 'subscribed' END,
                    CASE WHEN i.suppressed THEN $6 ELSE '' END, $2, $2, $2, $2, $2
                FROM import_subs i WHERE i.existing_sub IS NULL
                ORDER BY i.line
                RETURNING *
            )
            {_OUTBOX_INSERT}
            SELECT $3, s.user_id::text, $4,
                $5::bytea || {_EVENT_ID} || {_uuid_field(3, "s.user_id")}
                || {sub_fields}
            FROM inserted s
            """,
            plan.app_id,
            plan.at,
            IDENTITY_CHANGES.name,
            IDENTITY_CHANGES.event_type,
            created,
            suppressions.REASON,
        )
    # The created rows carry the opt-out now.
    await conn.execute(
        """
        DELETE FROM suppressions x USING import_subs i
        WHERE i.suppressed AND x.app_id = $1 AND x.type = i.type AND x.token_hash = ANY(i.hashes)
        """,
        plan.app_id,
    )
    # Users that held subscriptions before may now be past the cap: their least recently
    # active push subscriptions go (users the import created hold only what it gave them);
    # the opted-out ones among them are suppressed, as any deleted subscription is.
    evicted = await conn.fetch(
        f"""
        WITH touched AS (
            SELECT DISTINCT user_id FROM import_subs WHERE moved_in AND user_existed
        ), counted AS (
            SELECT s.user_id, count(*) AS held FROM subscriptions s
            JOIN touched t ON s.app_id = $1 AND s.user_id = t.user_id
            GROUP BY s.user_id HAVING count(*) > {MAX_SUBSCRIPTIONS_PER_USER}
        ), ranked AS (
            SELECT s.subscription_id, c.held, row_number() OVER (
                PARTITION BY s.user_id
                ORDER BY s.last_active_time, s.create_time, s.subscription_id) AS k
            FROM subscriptions s JOIN counted c ON s.app_id = $1 AND s.user_id = c.user_id
            WHERE s.type IN {_PUSH}
        ), evicted AS (
            DELETE FROM subscriptions s USING ranked r
            WHERE s.app_id = $1 AND s.subscription_id = r.subscription_id
              AND r.k <= r.held - {MAX_SUBSCRIPTIONS_PER_USER}
            RETURNING s.*
        ), published AS (
            {_OUTBOX_INSERT}
            SELECT $2, s.user_id::text, $3,
                $4::bytea || {_EVENT_ID} || {_uuid_field(3, "s.user_id")}
                || {sub_fields}
            FROM evicted s
        )
        SELECT type, token FROM evicted WHERE opt_in = 'unsubscribed'
        """,
        plan.app_id,
        IDENTITY_CHANGES.name,
        IDENTITY_CHANGES.event_type,
        removed,
    )
    await suppressions.record(conn, plan.app_id, [(r["type"], r["token"]) for r in evicted])


async def create_members_table(conn: DBConnection, table: str, *, empty: bool = False) -> None:
    """A temporary table ``table (user_id uuid)`` of every user the import wrote (none when
    ``empty``: the list-name check runs before there is a plan)."""
    if empty:
        await conn.execute(f"CREATE TEMP TABLE {table} (user_id uuid) ON COMMIT DROP")
        return
    await conn.execute(
        f"""
        CREATE TEMP TABLE {table} ON COMMIT DROP AS
        SELECT DISTINCT user_id FROM import_plan WHERE ok AND refusal IS NULL
        """
    )


def field_type_of(column: StagingColumn) -> FieldType:
    """The customer-field type an attribute column's values have."""
    assert column.kind is not None
    return column.kind.field_type
