"""Tracked events: the rules of TrackEvents and ListEvents, and what the consumer stores.

Events are Kafka-first (DESIGN §2). :func:`track_events` validates a batch, resolves each
event's user ref to a user id and publishes one ``TrackedEvent`` per accepted event on
``identity.events`` (keyed by user id, acks=all), answering once every record is acknowledged.
It writes no event to Postgres; the one write it may do is creating the profile that an
``external_id`` or ``alias`` ref names for the first time (as UpsertUser would, and as Braze's
``/users/track`` does), so an event about a CRM id never seen before is not lost. Identity's own
consumer (:mod:`services.identity.events_consumer`) stores the events, deduplicated by
``(app_id, event_id)``, and the journey engine reads the same topic.

Read-your-writes: an accepted event shows up in :func:`list_events` once the consumer stored it,
typically tens of milliseconds after TrackEvents answered (one consumer poll plus one insert);
longer while the consumer catches up on a backlog.

Properties stay a ``google.protobuf.Struct`` from the request to the Kafka payload (which is a
protobuf message by contract): converting them to Python values and back on a path meant for
tens of thousands of events per second would cost more than everything else together. They
become JSON once, in the consumer (:func:`properties_json`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

import aiokafka.errors
from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from tidings.events.v1.tracked_event_pb2 import TrackedEvent
from tidings.identity.v1.user_ref_pb2 import UserRef

from services.identity import event_pages, events_store, refs, users
from services.identity.access import AppCaller
from services.identity.events_store import Event
from services.runtime import paging
from services.runtime.app import ServiceContext
from services.runtime.db import DBConnection
from services.runtime.errors import (
    DomainError,
    FieldViolation,
    FieldViolations,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
)
from services.runtime.kafka import IDENTITY_EVENTS

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "FUTURE_SKEW",
    "MAX_BATCH",
    "MAX_EVENT_ID_LENGTH",
    "MAX_NAME_LENGTH",
    "MAX_PAGE_SIZE",
    "MAX_PROPERTIES_BYTES",
    "EventInput",
    "EventPage",
    "EventQuery",
    "TrackResult",
    "check_event",
    "check_properties",
    "decode_page_token",
    "encode_page_token",
    "list_events",
    "properties_json",
    "timestamp_datetime",
    "track_events",
]

#: Most events per TrackEvents call.
MAX_BATCH = 1000
#: Longest event name.
MAX_NAME_LENGTH = 128
#: Longest caller-supplied event id.
MAX_EVENT_ID_LENGTH = 128
#: Largest properties, serialised (protobuf encoding of the Struct).
MAX_PROPERTIES_BYTES = 64 * 1024
#: How far in the future an ``occurred_at`` may be: device clocks drift, time travel does not.
FUTURE_SKEW = timedelta(minutes=5)
#: ListEvents page size when the request leaves it 0.
DEFAULT_PAGE_SIZE = 100
#: Largest ListEvents page; bigger requests are coerced down to it (AIP-158).
MAX_PAGE_SIZE = 1000

_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
# Event ids are opaque but printable: control characters (NUL above all, which Postgres text
# cannot hold) would make the event unstorable.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# Per-event types are plain (not frozen) dataclasses: a frozen one's __init__ costs a few
# microseconds more, paid a thousand times per TrackEvents call.
@dataclass(slots=True)
class EventInput:
    """One event of a TrackEvents request.

    Attributes:
        ref: Who did it.
        name: Its name.
        properties: Its properties.
        occurred_at: When it happened; ``None`` means now.
        event_id: The caller's id for deduplication; empty to have one assigned.
    """

    ref: UserRef
    name: str
    properties: struct_pb2.Struct
    occurred_at: timestamp_pb2.Timestamp | None
    event_id: str


@dataclass(slots=True)
class TrackResult:
    """The outcome of one tracked event.

    Attributes:
        event_id: The event's id (the caller's, or the assigned one); empty when refused.
        user_id: The user it was attributed to; ``None`` when refused.
        error: Why it was refused; ``None`` when it was accepted.
    """

    event_id: str = ""
    user_id: uuid.UUID | None = None
    error: DomainError | None = None


# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799


def _timestamp_problem(value: timestamp_pb2.Timestamp) -> str | None:
    if not _MIN_SECONDS <= value.seconds <= _MAX_SECONDS or not 0 <= value.nanos < 1_000_000_000:
        return "is not a valid timestamp (years 1 to 9999)"
    return None


def timestamp_datetime(value: timestamp_pb2.Timestamp, field: str) -> datetime:
    """``value`` as an aware datetime.

    Raises:
        InvalidArgument: It is outside the range a Timestamp may hold (naming ``field``).
    """
    problem = _timestamp_problem(value)
    if problem is not None:
        raise InvalidArgument(
            f"{field} {problem}",
            reason="INVALID_TIMESTAMP",
            field_violations=[FieldViolation(field, problem)],
        )
    return value.ToDatetime(UTC)


def check_properties(properties: struct_pb2.Struct) -> str | None:
    """What makes ``properties`` unstorable, or ``None`` if nothing does.

    JSON (and so Postgres' jsonb) has no NaN or infinity, and Postgres cannot store the NUL
    character in text; both would otherwise be accepted here and fail in the consumer.
    """
    if properties.ByteSize() > MAX_PROPERTIES_BYTES:
        return f"must be at most {MAX_PROPERTIES_BYTES} bytes serialised"
    return _struct_problem(properties)


def _struct_problem(struct: struct_pb2.Struct) -> str | None:
    # Keys then lookups: the map's items() is a pure-Python view, measurably slower.
    fields = struct.fields
    for key in fields:
        if "\x00" in key:
            return "keys must not contain the NUL character"
        problem = _value_problem(fields[key])
        if problem is not None:
            return problem
    return None


def _value_problem(value: struct_pb2.Value) -> str | None:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        if not math.isfinite(value.number_value):
            return "numbers must be finite (JSON has no NaN or Infinity)"
    elif kind == "string_value":
        if "\x00" in value.string_value:
            return "strings must not contain the NUL character"
    elif kind == "struct_value":
        return _struct_problem(value.struct_value)
    elif kind == "list_value":
        for item in value.list_value.values:
            problem = _value_problem(item)
            if problem is not None:
                return problem
    return None


@functools.lru_cache(maxsize=4)
def _horizon(now: datetime) -> float:
    """The latest acceptable ``occurred_at`` (epoch seconds); one per batch, not per event."""
    return now.timestamp() + FUTURE_SKEW.total_seconds()


def check_event(
    index: int, event: EventInput, *, now: datetime, client: bool
) -> refs.RefKey | DomainError:
    """The checked user ref of event ``index`` of a TrackEvents batch, or why it is refused.

    Pure: the ref's shape is checked, it is not resolved.

    Args:
        index: Position in the request, for field paths (``events[3].occurred_at``).
        event: The event.
        now: The current time.
        client: Whether the caller holds a client key, which may track only for the
            ``subscription_id`` it registered.
    """
    prefix = f"events[{index}]"
    violations = FieldViolations()
    key = refs.parse_ref(event.ref, f"{prefix}.user", violations)
    if client and key is not None and not isinstance(key, refs.BySubscription):
        return PermissionDenied(
            "a client key may track events only for its own subscription: name the user by "
            "subscription_id",
            reason="CLIENT_KEY_REF_NOT_ALLOWED",
            metadata={"field": f"{prefix}.user"},
        )
    if not event.name:
        violations.add(f"{prefix}.name", "is required", reason="REQUIRED")
    elif len(event.name) > MAX_NAME_LENGTH or not _NAME.fullmatch(event.name):
        violations.add(
            f"{prefix}.name",
            f"must be 1 to {MAX_NAME_LENGTH} letters, digits, '_', '.' or '-'",
        )
    if len(event.event_id) > MAX_EVENT_ID_LENGTH:
        violations.add(f"{prefix}.event_id", f"must be at most {MAX_EVENT_ID_LENGTH} characters")
    elif _CONTROL.search(event.event_id):
        violations.add(f"{prefix}.event_id", "must not contain control characters")
    if event.occurred_at is not None:
        problem = _timestamp_problem(event.occurred_at)
        if problem is not None:
            violations.add(f"{prefix}.occurred_at", problem)
        elif event.occurred_at.seconds > _horizon(now):
            violations.add(
                f"{prefix}.occurred_at",
                f"is more than {int(FUTURE_SKEW.total_seconds() // 60)} minutes in the future",
                reason="IN_FUTURE",
            )
    problem = check_properties(event.properties)
    if problem is not None:
        violations.add(f"{prefix}.properties", problem)
    if violations or key is None:
        names = ", ".join(dict.fromkeys(v.field for v in violations))
        return InvalidArgument(
            f"invalid event: {names}", reason="INVALID_EVENT", field_violations=violations
        )
    return key


async def track_events(
    ctx: ServiceContext, caller: AppCaller, events: Sequence[EventInput]
) -> list[TrackResult]:
    """Validate, attribute and publish a batch of events; one result per event, in order.

    A refused event does not fail the others. The call returns once every accepted event is on
    ``identity.events`` (acknowledged by all in-sync replicas). Events are stored by the
    consumer afterwards; a retried batch stores nothing twice *if it carries the same event
    ids*, so callers that retry should set ``event_id`` themselves.

    Args:
        ctx: The service context (pool for resolving refs, producer, clock).
        caller: Who calls; a client key may only name a ``subscription_id``.
        events: The batch, at most :data:`MAX_BATCH`.

    Raises:
        InvalidArgument: More than :data:`MAX_BATCH` events (field ``events``).
        Unavailable: Kafka did not acknowledge every record; some may have been written, so
            a retry stores nothing twice only for events that set ``event_id``.
    """
    if len(events) > MAX_BATCH:
        raise InvalidArgument(
            f"at most {MAX_BATCH} events per call, got {len(events)}",
            reason="BATCH_TOO_LARGE",
            field_violations=[_violation("events", f"must hold at most {MAX_BATCH} events")],
        )
    now = ctx.clock()
    results: list[TrackResult] = [_UNSET] * len(events)  # every slot is set below
    keys: list[tuple[int, refs.RefKey]] = []
    client = caller.is_client
    for index, event in enumerate(events):
        checked = check_event(index, event, now=now, client=client)
        if isinstance(checked, DomainError):
            results[index] = TrackResult(error=checked)
        else:
            keys.append((index, checked))
    if not keys:
        return results

    # One query per kind of ref in the batch, not one per event.
    async with ctx.pool.acquire() as conn:
        found: dict[refs.RefKey, uuid.UUID | DomainError] = dict(
            await refs.lookup(conn, caller.app_id, [key for _, key in keys])
        )
        creatable = [
            key
            for key in dict.fromkeys(key for _, key in keys)
            if key not in found and isinstance(key, refs.ByExternalId | refs.ByAlias)
        ]
        if creatable:
            found.update(await _create_users(conn, caller.app_id, creatable, now))

    now_ts = timestamp_pb2.Timestamp()
    now_ts.FromDatetime(now)
    records: list[tuple[str, TrackedEvent]] = []
    for index, key in keys:
        resolved = found.get(key)
        if resolved is None:
            results[index] = TrackResult(error=refs.user_not_found(key))
            continue
        if isinstance(resolved, DomainError):
            results[index] = TrackResult(error=resolved)
            continue
        event = events[index]
        event_id = event.event_id or str(uuid.uuid4())
        message = TrackedEvent(
            event_id=event_id,
            app_id=caller.app_id,
            user_id=str(resolved),
            name=event.name,
            properties=event.properties,
        )
        if isinstance(key, refs.BySubscription):
            # The consumer counts it as the device's activity (push eviction order).
            message.subscription_id = str(key.subscription_id)
        message.occurred_at.CopyFrom(now_ts if event.occurred_at is None else event.occurred_at)
        records.append((message.user_id, message))
        results[index] = TrackResult(event_id=event_id, user_id=resolved)
    if records:
        try:
            await ctx.producer.send_many(IDENTITY_EVENTS, records)
        except aiokafka.errors.KafkaError as exc:
            raise Unavailable(
                "the events could not be written durably; retry the batch (events that set "
                "event_id are stored once however often they are retried; events without one "
                "get a new id per attempt and may be stored twice)",
                reason="EVENTS_NOT_WRITTEN",
            ) from exc
    return results


async def _create_users(
    conn: DBConnection, app_id: str, keys: Sequence[refs.RefKey], now: datetime
) -> dict[refs.RefKey, uuid.UUID | DomainError]:
    """Create the users that external id or alias refs name but that do not exist yet.

    As UpsertUser does for such refs (and as Braze's ``/users/track`` does): tracking an event
    for a CRM id seen for the first time creates its profile, holding that id or alias, and
    publishes ``user.created``. One batched upsert however many are new; an item that fails
    (a concurrent writer kept winning) is refused alone.
    """
    upserted = await users.upsert_users(
        conn,
        app_id,
        [users.UpsertRequest(ref=key, user=users.UserFields()) for key in keys],
        at=now,
    )
    return {
        key: outcome if isinstance(outcome, DomainError) else outcome.profile.user_id
        for key, outcome in zip(keys, upserted, strict=True)
    }


def _violation(field: str, description: str) -> FieldViolation:
    return FieldViolation(field, description)


M = TypeVar("M", bound=Message)

#: What a slot of :func:`track_events`' results holds until its event is decided.
_UNSET = TrackResult()


# ---------------------------------------------------------------------------------------------
# ListEvents


@dataclass(frozen=True, slots=True)
class EventQuery:
    """A ListEvents request in domain terms.

    Attributes:
        ref: Whose events.
        name: Only events with this name; empty for all.
        start_time: Only events at or after this time.
        end_time: Only events before this time.
        page_size: Requested page size; 0 means :data:`DEFAULT_PAGE_SIZE`.
        page_token: A ``next_page_token`` of a previous page of the same query, or empty.
    """

    ref: UserRef
    name: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True, slots=True)
class EventPage(Generic[M]):
    """One page of ListEvents.

    Attributes:
        events: The events as answered, newest first.
        next_page_token: Token of the next page; empty on the last one.
    """

    events: list[M]
    next_page_token: str


def _fingerprint(app_id: str, user_id: uuid.UUID, query: EventQuery) -> str:
    # Ties a page token to the query it came from, so it cannot be replayed with other filters
    # (which would silently skip or repeat events).
    parts = [
        app_id,
        str(user_id),
        query.name,
        query.start_time.isoformat() if query.start_time else "",
        query.end_time.isoformat() if query.end_time else "",
    ]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def encode_page_token(last: Event, fingerprint: str) -> str:
    """The opaque token that continues after ``last`` in the query ``fingerprint`` names."""
    return event_pages.encode_cursor(f"events/{fingerprint}", (last.occurred_at, last.event_id))


def decode_page_token(token: str, fingerprint: str) -> tuple[datetime, str]:
    """The ``(occurred_at, event_id)`` cursor in ``token``.

    Raises:
        InvalidArgument: The token is malformed or belongs to another query (field
            ``page_token``).
    """
    return event_pages.decode_cursor(f"events/{fingerprint}", token)


def _check_query(query: EventQuery) -> None:
    violations = FieldViolations()
    if query.name and (len(query.name) > MAX_NAME_LENGTH or not _NAME.fullmatch(query.name)):
        violations.add("name", f"must be 1 to {MAX_NAME_LENGTH} letters, digits, '_', '.' or '-'")
    if query.page_size < 0:
        violations.add("page_size", "must not be negative")
    if (
        query.start_time is not None
        and query.end_time is not None
        and query.start_time >= query.end_time
    ):
        violations.add("end_time", "must be after start_time")
    violations.raise_if_any()


async def list_events(
    ctx: ServiceContext, caller: AppCaller, query: EventQuery, render: Callable[[Event], M]
) -> EventPage[M]:
    """One page of a user's stored events, newest first (ties broken by event id).

    Events accepted by TrackEvents appear here once the consumer stored them, typically tens of
    milliseconds later (see the module docstring). A page holds at most ``page_size`` events
    and at most :data:`~services.identity.event_pages.MAX_PAGE_BYTES` of rendered ones.

    Args:
        ctx: The service context.
        caller: Who calls.
        query: The query.
        render: The message an event is answered as (its size bounds the page).

    Raises:
        InvalidArgument: Bad filters, a negative page size or a foreign page token.
        NotFound: The ref names no user of the caller's app.
    """
    _check_query(query)  # names a negative page_size along with any other bad field
    limit = paging.page_size(query.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
    async with ctx.pool.acquire() as conn:
        resolved = await refs.resolve_user_id(conn, caller.app_id, query.ref, field="user")
        fingerprint = _fingerprint(caller.app_id, resolved, query)
        after = decode_page_token(query.page_token, fingerprint) if query.page_token else None

        async def fetch(cursor: event_pages.Cursor | None, size: int) -> list[Event]:
            return await events_store.list_events(
                conn,
                caller.app_id,
                resolved,
                name=query.name or None,
                start_time=query.start_time,
                end_time=query.end_time,
                after=cursor,
                limit=size,
            )

        page = await event_pages.fill_page(fetch, render, after=after, limit=limit)
    next_token = (
        event_pages.encode_cursor(f"events/{fingerprint}", page.next_cursor)
        if page.next_cursor is not None
        else ""
    )
    return EventPage(events=page.items, next_page_token=next_token)


# ---------------------------------------------------------------------------------------------
# The consumer's side


def _to_json_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value.replace("\x00", "\ufffd")
    if kind == "number_value":
        number = value.number_value
        return number if math.isfinite(number) else None
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _to_json_object(value.struct_value)
    if kind == "list_value":
        return [_to_json_value(item) for item in value.list_value.values]
    return None  # null_value, or a Value with nothing set


def _to_json_object(struct: struct_pb2.Struct) -> dict[str, Any]:
    fields = struct.fields
    return {key.replace("\x00", "\ufffd"): _to_json_value(fields[key]) for key in fields}


def properties_json(properties: struct_pb2.Struct) -> str:
    """``properties`` as a JSON object that Postgres' jsonb accepts whatever the record holds.

    TrackEvents refuses what JSON or Postgres cannot hold, but a record may reach the topic
    another way; a value that could not be stored would block the consumer, so here non-finite
    numbers become ``null`` and NUL characters U+FFFD.
    """
    if not properties.fields:
        return "{}"
    return json.dumps(_to_json_object(properties), separators=(",", ":"))
