"""Segments: the rules of their definitions, counting, materialisation and membership reads.

* A segment is DYNAMIC (a condition tree, :mod:`services.identity.segment_conditions`) or a
  LIST (fixed members, created by an import: :func:`segments_store.create_list_segment`).
  Display names are unique per app (ALREADY_EXISTS, ``SEGMENT_NAME_TAKEN``).
* Definitions change one at a time per app (a transaction-level advisory lock), so two
  concurrent updates cannot make a ``member_of`` cycle, and a segment cannot be deleted while
  another is being made to refer to it. DeleteSegment is FAILED_PRECONDITION
  (``SEGMENT_IN_USE``) while another segment refers to it.
* **Materialisation** computes the members in full with one set-based statement
  (:func:`segments_store.apply_membership`): after CreateSegment, after a condition change, and
  for a segment whose materialisation a crash interrupted. It runs in its own transaction,
  after the definition committed, holding the segment's lock: the maintainer
  (:mod:`services.identity.segment_maintainer`) takes the same lock, so the two never write
  one segment's members at once, and a change committed while the materialisation ran is
  re-evaluated by the maintainer afterwards. Users who entered or left are queued for the
  segments that refer to this one.
* **Count** is a compiled ``count(*)`` over the app's users, now; a LIST counts its members.
* Another app's segment id is NOT_FOUND, like a missing one.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from services.identity import refs, segments_store, users_store
from services.identity.refs import RefKey
from services.identity.segment_conditions import (
    Condition,
    NoCondition,
    from_json,
    is_time_relative,
    to_json,
)
from services.identity.segment_sql import Scope, compile_condition
from services.identity.segment_validation import (
    Lookups,
    check_condition,
    custom_attribute_names,
    member_of_ids,
)
from services.identity.segments_store import (
    MAX_DISPLAY_NAME_LENGTH,
    MemberRow,
    Membership,
    SegmentRecord,
    name_taken,
)
from services.identity.validation import check_mask_paths, text_problem
from services.runtime.db import DBConnection
from services.runtime.errors import (
    FailedPrecondition,
    FieldViolations,
    NotFound,
)
from services.runtime.paging import bad_page_token, decode_page_token, encode_page_token, page_size

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_DESCRIPTION_LENGTH",
    "MAX_PAGE_SIZE",
    "MEMBER_PAGE",
    "SegmentDraft",
    "count",
    "create_segment",
    "delete_segment",
    "get_segment",
    "list_segments",
    "lock_definitions",
    "materialise",
    "membership",
    "parse_segment_id",
    "segment_condition",
    "stream_members",
    "update_segment",
]

#: ListSegments page size when the request leaves it 0.
DEFAULT_PAGE_SIZE = 100
#: Largest ListSegments page.
MAX_PAGE_SIZE = 1_000
#: Longest description.
MAX_DESCRIPTION_LENGTH = 1_000
#: Members read per query while streaming ListSegmentMembers.
MEMBER_PAGE = 1_000

_UPDATABLE = ("display_name", "description", "condition")


@dataclass(frozen=True, slots=True)
class SegmentDraft:
    """A segment as a create or update request gives it.

    Attributes:
        segment_id: The id (updates); empty on create.
        display_name: The name.
        description: Free text.
        kind: ``dynamic``, ``list`` or empty (unspecified).
        condition: The condition, if the request set one.
    """

    segment_id: str = ""
    display_name: str = ""
    description: str = ""
    kind: str = ""
    condition: Condition | None = None


def not_found(segment_id: object) -> NotFound:
    """The error for a segment id the caller's app does not have."""
    return NotFound(
        f"no segment {str(segment_id)[:64]!r}",
        reason="SEGMENT_NOT_FOUND",
        metadata={"segment_id": str(segment_id)[:64]},
    )


def parse_segment_id(text: str, field: str = "segment_id") -> uuid.UUID:
    """A segment id from a request.

    Raises:
        InvalidArgument: Empty (REQUIRED) or not a UUID (INVALID_ID), naming ``field``.
    """
    violations = FieldViolations()
    parsed = refs.parse_uuid(text, field, violations)
    violations.raise_if_any()
    assert parsed is not None
    return parsed


async def lock_definitions(conn: DBConnection, app_id: str) -> None:
    """One definition change per app at a time (see the module doc); also taken by a flip of
    a customer field's PII flag, which must not race a segment comparing the field."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('tidings.segments:' || $1, 0))", app_id
    )


async def _reaches(conn: DBConnection, app_id: str) -> dict[uuid.UUID, list[uuid.UUID]]:
    rows = await conn.fetch(
        "SELECT segment_id, refers_to FROM segments WHERE app_id = $1 AND refers_to <> '{}'",
        app_id,
    )
    return {row["segment_id"]: list(row["refers_to"]) for row in rows}


def _closure(graph: Mapping[uuid.UUID, list[uuid.UUID]]) -> Callable[[uuid.UUID], set[uuid.UUID]]:
    def reaches(start: uuid.UUID) -> set[uuid.UUID]:
        seen: set[uuid.UUID] = set()
        stack = list(graph.get(start, ()))
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.add(node)
                stack.extend(graph.get(node, ()))
        return seen

    return reaches


async def checked_condition(
    conn: DBConnection,
    app_id: str,
    condition: Condition | None,
    path: str,
    violations: FieldViolations,
    *,
    segment_id: uuid.UUID | None = None,
) -> Condition | None:
    """Validate a condition against the app's customer fields and segments.

    Returns:
        The condition with its attribute types resolved (unusable if violations were added).
    """
    if condition is None:
        violations.add(path, "required", reason="REQUIRED")
        return None
    names = custom_attribute_names(condition)
    fields = await users_store.customer_fields(conn, app_id, names) if names else {}
    referenced = member_of_ids(condition)
    segments = await segments_store.segments_by_id(conn, app_id, referenced) if referenced else {}
    graph = await _reaches(conn, app_id) if referenced and segment_id is not None else {}
    lookups = Lookups(
        field_types={name: field.type for name, field in fields.items()},
        segments={sid: record.kind for sid, record in segments.items()},
        reaches=_closure(graph),
        segment_id=segment_id,
        pii_fields=frozenset(name for name, field in fields.items() if field.pii),
    )
    return check_condition(condition, path, lookups, violations)


def _check_texts(
    draft: SegmentDraft, violations: FieldViolations, *, name: bool, description: bool
) -> None:
    if name:
        if not draft.display_name.strip():
            violations.add("segment.display_name", "required", reason="REQUIRED")
        else:
            problem = text_problem(draft.display_name, max_length=MAX_DISPLAY_NAME_LENGTH)
            if problem is not None:
                violations.add("segment.display_name", problem, reason="INVALID_TEXT")
    if description:
        problem = text_problem(draft.description, max_length=MAX_DESCRIPTION_LENGTH)
        if problem is not None:
            violations.add("segment.description", problem, reason="INVALID_TEXT")


def _refers_to(condition: Condition) -> list[uuid.UUID]:
    return sorted(member_of_ids(condition))


# -- definitions ---------------------------------------------------------------------------------


async def create_segment(
    pool: asyncpg.Pool, app_id: str, draft: SegmentDraft, *, at: datetime
) -> SegmentRecord:
    """Create a DYNAMIC segment and materialise its members before answering.

    Raises:
        InvalidArgument: A bad name, description, kind or condition (each field named).
        AlreadyExists: ``SEGMENT_NAME_TAKEN``.
    """
    violations = FieldViolations()
    _check_texts(draft, violations, name=True, description=True)
    if draft.kind == "list":
        violations.add(
            "segment.kind",
            "LIST segments are made by imports (ImportOptions.list_name); create a DYNAMIC one",
            reason="UNSUPPORTED_KIND",
        )
    async with pool.acquire() as conn:
        async with conn.transaction():
            await lock_definitions(conn, app_id)
            condition = await checked_condition(
                conn, app_id, draft.condition, "segment.condition", violations
            )
            violations.raise_if_any()
            assert condition is not None
            record = await segments_store.insert_segment(
                conn,
                app_id,
                segment_id=uuid.uuid4(),
                display_name=draft.display_name,
                description=draft.description,
                kind="dynamic",
                condition_json=json.dumps(to_json(condition)),
                refers_to=_refers_to(condition),
                time_relative=is_time_relative(condition),
                import_id=None,
                materialised=False,
                at=at,
            )
            if record is None:
                raise name_taken(draft.display_name, "segment.display_name")
        return await materialise(conn, record, at=at)


async def materialise(conn: DBConnection, record: SegmentRecord, *, at: datetime) -> SegmentRecord:
    """Compute a DYNAMIC segment's members in full (own transaction, under its lock).

    Returns:
        The segment afterwards (as given if it was deleted meanwhile or is a LIST).
    """
    async with conn.transaction():
        locked = await segments_store.lock_segment(conn, record.app_id, record.segment_id)
        if locked is None or locked.condition is None:
            return record
        compiled = compile_condition(
            segment_condition(locked), app_id=locked.app_id, now=at, scope=Scope.ALL
        )
        dependents = await segments_store.dependents_of(conn, locked.app_id, locked.segment_id)
        await segments_store.apply_membership(
            conn, locked, compiled, at=at, mark_changed_users=bool(dependents)
        )
        await segments_store.set_materialised(conn, locked.app_id, locked.segment_id, at)
        final = await segments_store.get_segment(conn, locked.app_id, locked.segment_id)
    return final or record


def segment_condition(record: SegmentRecord) -> Condition:
    """The stored condition of a DYNAMIC segment."""
    return from_json(record.condition) if record.condition is not None else NoCondition()


async def get_segment(conn: DBConnection, app_id: str, segment_id: uuid.UUID) -> SegmentRecord:
    """One segment of the app.

    Raises:
        NotFound: ``SEGMENT_NOT_FOUND`` (also for another app's segment).
    """
    record = await segments_store.get_segment(conn, app_id, segment_id)
    if record is None:
        raise not_found(segment_id)
    return record


async def list_segments(
    conn: DBConnection, app_id: str, *, size: int, token: str
) -> tuple[list[SegmentRecord], str]:
    """A page of the app's segments by name, and the next page's token (empty at the end)."""
    limit = page_size(size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
    after = None
    if token:
        position = decode_page_token("segments", token)
        after = position.get("n")
        if after is None:
            raise bad_page_token()
    page = await segments_store.list_segments(conn, app_id, after=after, limit=limit + 1)
    if len(page) <= limit:
        return page, ""
    page = page[:limit]
    return page, encode_page_token("segments", {"n": page[-1].display_name})


async def update_segment(
    pool: asyncpg.Pool,
    app_id: str,
    draft: SegmentDraft,
    mask: Sequence[str],
    *,
    at: datetime,
) -> SegmentRecord:
    """Change a segment's name, description or condition (then re-materialised).

    Args:
        pool: The database.
        app_id: The caller's app.
        draft: The new values, with the segment's id.
        mask: The fields to change; empty means every field the request set.

    Raises:
        InvalidArgument: A bad mask path or field value.
        NotFound: ``SEGMENT_NOT_FOUND``.
        AlreadyExists: ``SEGMENT_NAME_TAKEN``.
        FailedPrecondition: ``LIST_SEGMENT_CONDITION``: a LIST has no condition.
    """
    violations = FieldViolations()
    if not draft.segment_id:
        violations.add("segment.segment_id", "required", reason="REQUIRED")
    check_mask_paths(mask, _UPDATABLE, violations)
    fields = set(mask) or {
        name
        for name, given in (
            ("display_name", bool(draft.display_name)),
            ("description", bool(draft.description)),
            ("condition", draft.condition is not None),
        )
        if given
    }
    if not mask and not fields and draft.segment_id:
        violations.add(
            "update_mask", "nothing to update: set a field or list it", reason="REQUIRED"
        )
    _check_texts(
        draft, violations, name="display_name" in fields, description="description" in fields
    )
    violations.raise_if_any()
    segment_id = parse_segment_id(draft.segment_id, "segment.segment_id")
    async with pool.acquire() as conn:
        async with conn.transaction():
            await lock_definitions(conn, app_id)
            current = await segments_store.lock_segment(conn, app_id, segment_id)
            if current is None:
                raise not_found(segment_id)
            condition: Condition | None = None
            if "condition" in fields:
                if current.kind == "list":
                    raise FailedPrecondition(
                        "a LIST segment has no condition; its members come from an import",
                        reason="LIST_SEGMENT_CONDITION",
                    )
                condition = await checked_condition(
                    conn,
                    app_id,
                    draft.condition,
                    "segment.condition",
                    violations,
                    segment_id=segment_id,
                )
                violations.raise_if_any()
            new_json = json.dumps(to_json(condition)) if condition is not None else None
            changed = condition is not None and json.loads(new_json or "null") != current.condition
            record = await segments_store.update_segment(
                conn,
                current,
                display_name=draft.display_name
                if "display_name" in fields
                else current.display_name,
                description=draft.description if "description" in fields else current.description,
                condition_json=new_json if condition is not None else _stored_json(current),
                refers_to=_refers_to(condition) if condition is not None else current.refers_to,
                time_relative=is_time_relative(condition)
                if condition is not None
                else current.time_relative,
                rematerialise=changed,
                at=at,
            )
            if record is None:
                raise name_taken(draft.display_name, "segment.display_name")
        if changed:
            record = await materialise(conn, record, at=at)
    return record


def _stored_json(record: SegmentRecord) -> str | None:
    return json.dumps(record.condition) if record.condition is not None else None


async def delete_segment(pool: asyncpg.Pool, app_id: str, segment_id: uuid.UUID) -> None:
    """Delete a segment with its members and history (no exit facts).

    Raises:
        NotFound: ``SEGMENT_NOT_FOUND``.
        FailedPrecondition: ``SEGMENT_IN_USE``: another segment's condition refers to it.
    """
    async with pool.acquire() as conn, conn.transaction():
        await lock_definitions(conn, app_id)
        if await segments_store.lock_segment(conn, app_id, segment_id) is None:
            raise not_found(segment_id)
        users = await segments_store.dependents_of(conn, app_id, segment_id)
        if users:
            names = ", ".join(repr(s.display_name) for s in users[:5])
            raise FailedPrecondition(
                f"segment(s) {names} refer to this one: change or delete them first",
                reason="SEGMENT_IN_USE",
                metadata={"segment_ids": ",".join(str(s.segment_id) for s in users[:20])},
            )
        await segments_store.delete_segment(conn, app_id, segment_id)


# -- counting and reading members ----------------------------------------------------------------


async def count(
    pool: asyncpg.Pool,
    app_id: str,
    *,
    segment_id: uuid.UUID | None,
    condition: Condition | None,
    at: datetime,
) -> int:
    """The users matching a saved segment or an unsaved condition, now.

    Raises:
        InvalidArgument: Neither given, or a bad condition (fields under ``condition``).
        NotFound: ``SEGMENT_NOT_FOUND``.
    """
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        if segment_id is not None:
            record = await get_segment(conn, app_id, segment_id)
            if record.kind == "list":
                return record.member_count
            resolved = segment_condition(record)
        else:
            violations = FieldViolations()
            checked = await checked_condition(conn, app_id, condition, "condition", violations)
            violations.raise_if_any()
            assert checked is not None
            resolved = checked
        compiled = compile_condition(resolved, app_id=app_id, now=at, scope=Scope.ALL)
        return await segments_store.count_matching(conn, compiled)


async def stream_members(
    pool: asyncpg.Pool,
    app_id: str,
    segment_id: uuid.UUID,
    *,
    after_user_id: uuid.UUID | None = None,
) -> AsyncIterator[MemberRow]:
    """Every current member, in user id order, from one snapshot.

    The whole stream reads one REPEATABLE READ snapshot taken when it starts, paged by user id
    (keyset): each user who was a member at that moment comes exactly once, however long the
    stream and whatever changes meanwhile; later changes show in the next call. With
    ``after_user_id`` only members with a greater id come: a caller resumes by the last id it
    handled, not by a count, which members joining or leaving meanwhile would shift.

    Raises:
        NotFound: ``SEGMENT_NOT_FOUND`` (before anything is streamed).
    """
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        await get_segment(conn, app_id, segment_id)
        after = after_user_id
        while True:
            page = await segments_store.member_page(
                conn, app_id, segment_id, after=after, limit=MEMBER_PAGE
            )
            for row in page:
                yield row
            if len(page) < MEMBER_PAGE:
                return
            after = page[-1].user_id


@dataclass(frozen=True, slots=True)
class MembershipAnswer:
    """GetSegmentMembership's answer.

    Attributes:
        member: Whether the user is a member now (as materialised).
        member_at_time: Whether the user was a member at the asked time (False if not asked).
        periods: Every period of membership, oldest first; the last is open (None) while a
            member.
    """

    member: bool
    member_at_time: bool
    periods: list[tuple[datetime, datetime | None]]


async def membership(
    pool: asyncpg.Pool,
    app_id: str,
    segment_id: uuid.UUID,
    user: RefKey,
    *,
    at_time: datetime | None,
) -> MembershipAnswer:
    """Whether a user is (and was at ``at_time``) a member, with every period.

    Raises:
        NotFound: ``SEGMENT_NOT_FOUND`` or ``USER_NOT_FOUND``.
    """
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        await get_segment(conn, app_id, segment_id)
        user_id = (await refs.lookup(conn, app_id, [user])).get(user)
        if user_id is None:
            raise refs.user_not_found(user)
        found: Membership = await segments_store.membership_of(conn, app_id, segment_id, user_id)
    periods: list[tuple[datetime, datetime | None]] = list(found.periods)
    if found.enter_time is not None:
        periods.append((found.enter_time, None))
    periods.sort(key=lambda period: period[0])
    was = at_time is not None and any(
        start <= at_time and (end is None or at_time < end) for start, end in periods
    )
    return MembershipAnswer(
        member=found.enter_time is not None, member_at_time=was, periods=periods
    )
