"""Journeys: create, read, edit (versions), validate, and the lifecycle.

Versions: a journey's definition is versioned. Editing a draft that was never activated
rewrites it in place; editing the definition of a journey that has an activated version creates
a new draft version (latest = N+1) and leaves the active one serving. Activate makes the latest
version the one new entries go to; customers already inside finish on the version they entered
(their row names it), never moved.

Lifecycle:

* ``draft`` → Activate → ``active``: validated first (FAILED_PRECONDITION listing every problem);
  all-contacts, segment (unless `only_future_members`) and birthday entries start an audience job.
* ``active`` → Pause → ``paused``: nobody enters; every customer's wake time is parked, so no
  step runs and no send is requested; events and receipts that a waiting customer gets
  meanwhile are remembered and taken on Resume. Goals still convert.
* ``paused`` → Resume → ``active``: parked wake times come back; what came due while paused
  runs at once (late), the rest keeps its time.
* ``active``/``paused`` → Stop → ``stopped`` (final): nobody enters; every customer inside is
  exited (their open step closed with ``(stopped)``); no send is requested after the Stop
  commits (requests committed before it are still relayed and delivered, see docs/journey.md).
* Delete: only ``draft`` or ``stopped`` journeys, with everything recorded about them.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

import asyncpg
from tidings.journey.v1 import journey_pb2 as jpb

from services.journey import definitions, instances_store, journeys_store
from services.journey.definitions import Problem
from services.journey.journeys_store import JourneyRow
from services.journey.peers import PeerRefused, Peers, PeerUnavailable
from services.runtime import paging
from services.runtime.errors import (
    FailedPrecondition,
    FieldViolation,
    FieldViolations,
    NotFound,
)

__all__ = [
    "activate",
    "create",
    "delete",
    "get",
    "list_page",
    "parse_journey_id",
    "pause",
    "resume",
    "stop",
    "update",
    "validate",
]

MAX_NAME = 200
MAX_DESCRIPTION = 2000
MAX_DEFINITION_BYTES = 1 << 20
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_UPDATABLE = frozenset({"display_name", "description", "definition"})


def parse_journey_id(text: str, field: str = "journey_id") -> uuid.UUID:
    """A journey id from a request.

    Raises:
        InvalidArgument: Naming ``field`` when empty or not an id.
    """
    violations = FieldViolations()
    try:
        return uuid.UUID(text)
    except ValueError:
        violations.add(field, "required" if not text else "not a journey id")
        violations.raise_if_any()
        raise AssertionError("unreachable") from None


def not_found(journey_id: uuid.UUID) -> NotFound:
    """The error for a journey the app does not have."""
    return NotFound(
        f"no journey {journey_id}",
        reason="JOURNEY_NOT_FOUND",
        metadata={"journey_id": str(journey_id)},
    )


def _check_names(display_name: str, description: str, prefix: str, v: FieldViolations) -> None:
    if not display_name.strip():
        v.add(f"{prefix}display_name", "required", reason="REQUIRED")
    elif len(display_name) > MAX_NAME:
        v.add(f"{prefix}display_name", f"at most {MAX_NAME} characters")
    if len(description) > MAX_DESCRIPTION:
        v.add(f"{prefix}description", f"at most {MAX_DESCRIPTION} characters")


def _definition_bytes(definition: jpb.JourneyDefinition, v: FieldViolations) -> bytes:
    data = definition.SerializeToString(deterministic=True)
    if len(data) > MAX_DEFINITION_BYTES:
        v.add("journey.definition", "a definition is at most 1 MiB")
    return data


async def create(pool: asyncpg.Pool, app_id: str, journey: jpb.Journey, at: datetime) -> JourneyRow:
    """A new draft journey (version 1)."""
    violations = FieldViolations()
    _check_names(journey.display_name, journey.description, "journey.", violations)
    data = _definition_bytes(journey.definition, violations)
    violations.raise_if_any()
    journey_id = uuid.uuid4()
    async with pool.acquire() as conn, conn.transaction():
        await journeys_store.insert_journey(
            conn, app_id, journey_id, journey.display_name.strip(), journey.description, data, at
        )
        row = await journeys_store.get_journey(conn, app_id, journey_id)
    assert row is not None
    return row


async def get(
    pool: asyncpg.Pool, app_id: str, journey_id: uuid.UUID, version: int = 0
) -> JourneyRow:
    """A journey at its latest version or at ``version``."""
    if version < 0:
        violations = FieldViolations()
        violations.add("version", "must not be negative")
        violations.raise_if_any()
    async with pool.acquire() as conn:
        row = await journeys_store.get_journey(conn, app_id, journey_id, version)
    if row is None:
        if version:
            raise NotFound(
                f"journey {journey_id} has no version {version}", reason="VERSION_NOT_FOUND"
            )
        raise not_found(journey_id)
    return row


async def list_page(
    pool: asyncpg.Pool, app_id: str, size: int, token: str
) -> tuple[list[JourneyRow], str]:
    """A page of the app's journeys, newest first."""
    limit = paging.page_size(size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
    after = None
    if token:
        position = paging.decode_page_token("journeys", token)
        try:
            after = (datetime.fromisoformat(position["t"]), uuid.UUID(position["id"]))
        except (KeyError, ValueError):
            raise paging.bad_page_token() from None
    async with pool.acquire() as conn:
        rows = await journeys_store.list_journeys(conn, app_id, limit + 1, after)
    next_token = ""
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_token = paging.encode_page_token(
            "journeys", {"t": last.create_time.isoformat(), "id": str(last.journey_id)}
        )
    return rows, next_token


async def update(
    pool: asyncpg.Pool,
    app_id: str,
    journey: jpb.Journey,
    mask: Sequence[str],
    at: datetime,
) -> JourneyRow:
    """Change names and/or the definition (a new draft version once one was activated)."""
    journey_id = parse_journey_id(journey.journey_id, "journey.journey_id")
    violations = FieldViolations()
    paths = list(mask) or sorted(_UPDATABLE)
    for path in paths:
        if path not in _UPDATABLE:
            violations.add(
                "update_mask", f"{path!r} cannot be changed (one of {sorted(_UPDATABLE)})"
            )
    data = _definition_bytes(journey.definition, violations) if "definition" in paths else b""
    async with pool.acquire() as conn, conn.transaction():
        row = await journeys_store.lock_journey(conn, app_id, journey_id)
        if row is None:
            raise not_found(journey_id)
        name = journey.display_name if "display_name" in paths else row.display_name
        description = journey.description if "description" in paths else row.description
        _check_names(name, description, "journey.", violations)
        violations.raise_if_any()
        latest = row.latest_version
        if "definition" in paths:
            if row.state == "stopped":
                raise FailedPrecondition(
                    "a stopped journey cannot change its definition", reason="JOURNEY_STOPPED"
                )
            if row.version_activated:
                latest += 1
                await journeys_store.insert_version(conn, app_id, journey_id, latest, data, at)
            else:
                await journeys_store.replace_definition(conn, app_id, journey_id, latest, data)
        await journeys_store.update_names(
            conn, app_id, journey_id, name.strip(), description, latest, at
        )
        updated = await journeys_store.get_journey(conn, app_id, journey_id)
    assert updated is not None
    return updated


async def delete(pool: asyncpg.Pool, app_id: str, journey_id: uuid.UUID) -> None:
    """Delete a draft or stopped journey."""
    async with pool.acquire() as conn, conn.transaction():
        row = await journeys_store.lock_journey(conn, app_id, journey_id)
        if row is None:
            raise not_found(journey_id)
        if row.state not in ("draft", "stopped"):
            raise FailedPrecondition(
                f"a {row.state} journey cannot be deleted: stop it first",
                reason="JOURNEY_NOT_DELETABLE",
            )
        await journeys_store.delete_journey(conn, app_id, journey_id)


async def problems_of(
    peers: Peers,
    app_id: str,
    definition: jpb.JourneyDefinition,
    *,
    allow_private: bool,
    check_templates: bool,
) -> list[Problem]:
    """Every problem: the definition's own, then segments and templates asked of the peers."""
    problems = definitions.check(definition, allow_private=allow_private)
    segments: list[tuple[str, str, str]] = []
    if definition.entry.WhichOneof("kind") == "segment" and definition.entry.segment.segment_id:
        segments.append(
            ("", "definition.entry.segment.segment_id", definition.entry.segment.segment_id)
        )
    templates: list[tuple[str, str, str]] = []
    for i, node in enumerate(definition.nodes):
        kind = definitions.node_kind(node)
        if kind == "branch":
            for suffix, segment_id in definitions.condition_segment_ids(node.branch.condition):
                segments.append(
                    (node.node_id, f"definition.nodes[{i}].branch.condition{suffix}", segment_id)
                )
        elif kind == "send" and node.send.template_id:
            templates.append(
                (node.node_id, f"definition.nodes[{i}].send.template_id", node.send.template_id)
            )
    for node_id, field, segment_id in segments:
        try:
            if not await peers.segment_exists(app_id, segment_id):
                problems.append(
                    Problem(node_id, field, "UNKNOWN_SEGMENT", f"no segment {segment_id!r}")
                )
        except (PeerUnavailable, PeerRefused) as exc:
            if isinstance(exc, PeerRefused) and exc.code.name == "UNIMPLEMENTED":
                continue
            problems.append(
                Problem(node_id, field, "NOT_VERIFIED", f"identity could not check it: {exc}")
            )
    if check_templates:
        for node_id, field, template_id in templates:
            try:
                if not await peers.template_exists(app_id, template_id):
                    problems.append(
                        Problem(node_id, field, "MISSING_TEMPLATE", f"no template {template_id!r}")
                    )
            except (PeerUnavailable, PeerRefused) as exc:
                if isinstance(exc, PeerRefused) and exc.code.name == "UNIMPLEMENTED":
                    continue
                problems.append(
                    Problem(node_id, field, "NOT_VERIFIED", f"delivery could not check it: {exc}")
                )
    return problems


async def validate(
    pool: asyncpg.Pool,
    peers: Peers,
    app_id: str,
    journey_id: uuid.UUID,
    *,
    allow_private: bool,
    check_templates: bool,
) -> list[Problem]:
    """The problems of a journey's latest version."""
    row = await get(pool, app_id, journey_id)
    return await problems_of(
        peers,
        app_id,
        jpb.JourneyDefinition.FromString(row.definition),
        allow_private=allow_private,
        check_templates=check_templates,
    )


def _problems_error(problems: Sequence[Problem]) -> FailedPrecondition:
    return FailedPrecondition(
        f"the journey has {len(problems)} problem(s); ValidateJourney lists them",
        reason="JOURNEY_INVALID",
        field_violations=[
            FieldViolation(p.field, f"{p.node_id + ': ' if p.node_id else ''}{p.message}", p.reason)
            for p in problems
        ],
    )


_AUDIENCE_KINDS = {"all_contacts": "all_contacts", "birthday": "birthday"}


async def activate(
    pool: asyncpg.Pool,
    peers: Peers,
    app_id: str,
    journey_id: uuid.UUID,
    at: datetime,
    *,
    allow_private: bool,
    check_templates: bool,
) -> JourneyRow:
    """Make the latest version the active one (validating it first)."""
    row = await get(pool, app_id, journey_id)
    if row.state in ("stopped", "paused"):
        raise FailedPrecondition(
            f"a {row.state} journey cannot be activated"
            + (": resume it" if row.state == "paused" else ""),
            reason="JOURNEY_NOT_ACTIVATABLE",
        )
    definition = jpb.JourneyDefinition.FromString(row.definition)
    problems = await problems_of(
        peers, app_id, definition, allow_private=allow_private, check_templates=check_templates
    )
    if problems:
        raise _problems_error(problems)
    async with pool.acquire() as conn, conn.transaction():
        locked = await journeys_store.lock_journey(conn, app_id, journey_id)
        if locked is None:
            raise not_found(journey_id)
        # update_time moves with every edit, a draft rewritten in place included: what was
        # validated above must be what goes live.
        if (locked.latest_version, locked.state, locked.update_time) != (
            row.latest_version,
            row.state,
            row.update_time,
        ):
            raise FailedPrecondition(
                "the journey changed while it was being activated; try again",
                reason="JOURNEY_CHANGED",
            )
        if locked.active_version == locked.latest_version and locked.state == "active":
            return locked  # already active at this version: nothing to do
        await journeys_store.set_state(
            conn, app_id, journey_id, "active", at, active_version=locked.latest_version
        )
        entry = definition.entry
        kind = entry.WhichOneof("kind") or ""
        job_kind = _AUDIENCE_KINDS.get(kind)
        segment_id = ""
        if kind == "segment" and not entry.segment.only_future_members:
            job_kind, segment_id = "segment", entry.segment.segment_id
        if job_kind is not None:
            await conn.execute(
                """
                INSERT INTO audience_jobs (app_id, journey_id, version, kind, segment_id)
                VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING
                """,
                app_id,
                journey_id,
                locked.latest_version,
                job_kind,
                segment_id,
            )
        if kind != "birthday":
            await conn.execute(
                "DELETE FROM entry_timers WHERE app_id = $1 AND journey_id = $2",
                app_id,
                journey_id,
            )
        updated = await journeys_store.get_journey(conn, app_id, journey_id)
    assert updated is not None
    return updated


async def _transition(
    pool: asyncpg.Pool,
    app_id: str,
    journey_id: uuid.UUID,
    at: datetime,
    allowed: tuple[str, ...],
    target: str,
) -> JourneyRow:
    async with pool.acquire() as conn, conn.transaction():
        row = await journeys_store.lock_journey(conn, app_id, journey_id)
        if row is None:
            raise not_found(journey_id)
        if row.state == target:
            return row
        if row.state not in allowed:
            raise FailedPrecondition(
                f"a {row.state} journey cannot become {target}",
                reason="JOURNEY_STATE_CONFLICT",
                metadata={"state": row.state},
            )
        await journeys_store.set_state(conn, app_id, journey_id, target, at)
        if target == "paused":
            await instances_store.park(conn, app_id, journey_id)
        elif target == "active":
            await instances_store.unpark(conn, app_id, journey_id)
        elif target == "stopped":
            await instances_store.exit_all(conn, app_id, journey_id, "(stopped)", at)
            await conn.execute(
                "UPDATE audience_jobs SET done = true WHERE app_id = $1 AND journey_id = $2",
                app_id,
                journey_id,
            )
            await conn.execute(
                "DELETE FROM audience_pages WHERE app_id = $1 AND journey_id = $2"
                " AND entered IS NULL",
                app_id,
                journey_id,
            )
            await conn.execute(
                "DELETE FROM entry_timers WHERE app_id = $1 AND journey_id = $2",
                app_id,
                journey_id,
            )
        updated = await journeys_store.get_journey(conn, app_id, journey_id)
    assert updated is not None
    return updated


async def pause(pool: asyncpg.Pool, app_id: str, journey_id: uuid.UUID, at: datetime) -> JourneyRow:
    """Pause an active journey (see the module doc)."""
    return await _transition(pool, app_id, journey_id, at, ("active",), "paused")


async def resume(
    pool: asyncpg.Pool, app_id: str, journey_id: uuid.UUID, at: datetime
) -> JourneyRow:
    """Resume a paused journey."""
    return await _transition(pool, app_id, journey_id, at, ("paused",), "active")


async def stop(pool: asyncpg.Pool, app_id: str, journey_id: uuid.UUID, at: datetime) -> JourneyRow:
    """Stop a journey for good."""
    return await _transition(pool, app_id, journey_id, at, ("active", "paused"), "stopped")


async def audience_progress(
    pool: asyncpg.Pool, app_id: str, journey_id: uuid.UUID, version: int
) -> tuple[int, int, bool] | None:
    """``(scanned, entered, done)`` of the activation's audience job, if it has one."""
    # Done once everything was read and every page read was entered.
    row = await pool.fetchrow(
        """
        SELECT j.scanned, j.entered + coalesce(sum(p.entered), 0) AS entered,
               j.done AND count(p.page_no) = count(p.entered) AS done
        FROM audience_jobs j
        LEFT JOIN audience_pages p
          ON p.app_id = j.app_id AND p.journey_id = j.journey_id AND p.version = j.version
        WHERE j.app_id = $1 AND j.journey_id = $2 AND j.version = $3
        GROUP BY j.app_id, j.journey_id, j.version
        """,
        app_id,
        journey_id,
        version,
    )
    return None if row is None else (int(row["scanned"]), int(row["entered"]), bool(row["done"]))
