"""Identity's consumer of ``identity.events``: stores tracked events in Postgres, in batches.

Runs as a background task of every identity replica (:func:`run_events_consumer`). Per polled
batch (up to :data:`MAX_BATCH` records):

1. records are decoded; one that cannot be stored at all (no event id, a user id that is not a
   UUID) is logged and skipped rather than blocking its partition;
2. the monthly partitions the batch needs are created if missing (see
   :mod:`services.identity.events_store`);
3. in one transaction the batch's users are looked up and locked ``FOR KEY SHARE``; events of
   users this database does not have are dropped — apps of other databases (the dev stack, test
   processes and benchmarks share the topic) and users erased since — and events of a profile
   that Login merged away follow it into the profile it was merged into;
4. the rest are inserted, deduplicated by ``(app_id, event_id)`` through ``event_ids``, so a
   retried TrackEvents batch or a redelivered record stores nothing twice; their users are
   queued for segment re-evaluation in the same transaction;
5. events tracked by ``subscription_id`` (the record says which) count as that subscription's
   activity: its ``last_active_time`` moves to the newest of their times (never past now), in
   one statement per batch that skips subscriptions active in the last
   :data:`ACTIVITY_RESOLUTION`, so a busy device costs one write an hour.

Offsets are committed by :class:`~services.runtime.kafka.BatchConsumer` only after the handler
returned, i.e. after the transaction committed.

The consumer group is ``identity.store-events.<database id>`` (``outbox_instance.id``): replicas
of one database share the group and split the partitions, while two databases (a test process
and the dev stack) never split one group's partitions between them and each sees every record.

A group that has no committed offsets yet (a new database) starts at the records produced
shortly before its oldest app was created instead of at the beginning of the topic: records
older than every app of this database cannot belong to it, and the shared topic may hold
millions of them (benchmarks), which a new test database would otherwise wade through first.
"""

from __future__ import annotations

import logging
import uuid
import weakref
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta

import asyncpg
from prometheus_client import Counter
from tidings.events.v1.tracked_event_pb2 import TrackedEvent

from services.identity import events_store, segments_store, subscriptions_store
from services.identity.events import properties_json
from services.identity.events_store import NewEvent
from services.runtime.app import Clock, ServiceContext
from services.runtime.kafka import IDENTITY_EVENTS, BatchConsumer, Record, start_new_group_at
from services.runtime.metrics import Metrics

__all__ = [
    "ACTIVITY_RESOLUTION",
    "GROUP_PREFIX",
    "MAX_BATCH",
    "EventStorer",
    "group_id_for",
    "run_events_consumer",
]

log = logging.getLogger(__name__)

#: Consumer group prefix; the database id follows.
GROUP_PREFIX = "identity.store-events"
#: Most records per stored batch: big enough to amortise a round trip, small enough that one
#: transaction stays short.
MAX_BATCH = 2000
#: How far before the oldest app a new group starts: the record timestamp is the producing
#: process's clock, the app's create time the database's, so this covers clock skew between
#: machines (NTP keeps it to milliseconds). Kept short: a new database should not wade through
#: what others produced just before it (a benchmark writes hundreds of thousands of records).
_START_MARGIN = timedelta(seconds=10)
#: Merged-away profiles are followed this many times (A merged into B, B into C, ...).
_MERGE_HOPS = 3
#: A subscription's ``last_active_time`` is kept to within this much of its latest event: it
#: orders evictions at the cap, where hours matter and per-event writes would not pay.
ACTIVITY_RESOLUTION = timedelta(hours=1)


def group_id_for(instance_id: str) -> str:
    """The consumer group of the database with lineage id ``instance_id``."""
    return f"{GROUP_PREFIX}.{instance_id}"


class EventStorer:
    """The batch handler: turns ``TrackedEvent`` records into stored events.

    Args:
        pool: The identity database.
        clock: Current time (for the partition window).
        stored: Counter of stored events, if metrics are wanted.
        dropped: Counter of dropped events, by reason, if metrics are wanted.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        clock: Clock,
        stored: Counter | None = None,
        dropped: Counter | None = None,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._stored = stored
        self._dropped = dropped
        self._months: set[date] = set()
        self._apps: set[str] = set()

    async def prepare(self) -> None:
        """Learn the existing partitions and create those around the current month."""
        async with self._pool.acquire() as conn:
            self._months = await events_store.month_partitions(conn)
        current = events_store.month_of(self._clock())
        await self._ensure_months({_shift(current, -1), current, _shift(current, 1)})

    async def _ensure_months(self, months: set[date]) -> None:
        first, last = events_store.partition_window(self._clock())
        missing = {m for m in months if first <= m <= last} - self._months
        if not missing:
            return
        async with self._pool.acquire() as conn:
            created = await events_store.ensure_month_partitions(conn, missing)
        if created:
            log.info(
                "created event partitions %s",
                ", ".join(events_store.partition_name(m) for m in created),
            )
        self._months |= missing

    async def handle(self, records: Sequence[Record[TrackedEvent]]) -> None:
        """Store a batch; idempotent, so a redelivered batch changes nothing."""
        # Records of other databases' apps are dropped before any per-record work: after a
        # benchmark the shared topic can hold millions of them.
        known = await self._known_apps({record.value.app_id for record in records})
        ours = [record for record in records if record.value.app_id in known]
        self._count_dropped("unknown_app", len(records) - len(ours))
        user_ids: dict[str, uuid.UUID | None] = {}
        parsed = [(r, e) for r in ours if (e := _new_event(r, user_ids)) is not None]
        events = [event for _, event in parsed]
        self._count_dropped("malformed", len(ours) - len(events))
        if not events:
            return
        now = self._clock()
        active = _subscription_activity(parsed, now)
        await self._ensure_months({events_store.month_of(e.occurred_at) for e in events})
        async with self._pool.acquire() as conn, conn.transaction():
            owners = await _current_owners(conn, {(e.app_id, e.user_id) for e in events})
            kept = []
            for event in events:
                owner = owners.get((event.app_id, event.user_id))
                if owner is None:
                    continue
                if owner != event.user_id:
                    event = NewEvent(
                        app_id=event.app_id,
                        user_id=owner,
                        event_id=event.event_id,
                        name=event.name,
                        properties_json=event.properties_json,
                        occurred_at=event.occurred_at,
                        receive_time=event.receive_time,
                    )
                kept.append(event)
            stored = await events_store.insert_events(conn, kept)
            if stored:
                # Event conditions of segments may now hold (or not) for these users.
                await segments_store.mark_dirty(conn, {(e.app_id, e.user_id) for e in kept})
            # Last: it locks subscriptions, which nothing above may wait behind.
            await subscriptions_store.record_activity(
                conn, active, fresh_after=now - ACTIVITY_RESOLUTION
            )
        self._count_dropped("unknown_user", len(events) - len(kept))
        self._count_dropped("duplicate", len(kept) - stored)
        if self._stored is not None:
            self._stored.inc(stored)

    async def _known_apps(self, app_ids: set[str]) -> set[str]:
        # Apps are only ever added (an erased one's users are gone, which the owner lookup
        # sees), so the apps found once are remembered; unknown ones are asked again, since an
        # app may be created after its id was first seen.
        unknown = app_ids - self._apps
        if unknown:
            async with self._pool.acquire() as conn:
                self._apps |= await events_store.known_apps(conn, unknown)
        return app_ids & self._apps

    def _count_dropped(self, reason: str, count: int) -> None:
        if self._dropped is not None and count > 0:
            self._dropped.labels(reason).inc(count)


def _shift(month: date, months: int) -> date:
    index = month.year * 12 + month.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# fromtimestamp is about twice as fast as adding a timedelta to the epoch (two per event);
# both are exact for whole seconds in UTC. Anything it refuses takes the timedelta, which
# raises OverflowError as before.
def _from_millis(millis: int) -> datetime:
    try:
        moment = datetime.fromtimestamp(millis // 1000, UTC)
    except (ValueError, OverflowError, OSError):
        return _EPOCH + timedelta(milliseconds=millis)
    return moment.replace(microsecond=millis % 1000 * 1000)


def _from_timestamp(seconds: int, nanos: int) -> datetime:
    if 0 <= nanos < 1_000_000_000:
        try:
            moment = datetime.fromtimestamp(seconds, UTC)
        except (ValueError, OverflowError, OSError):
            pass
        else:
            return moment.replace(microsecond=nanos // 1000) if nanos else moment
    return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)


def _subscription_activity(
    parsed: Sequence[tuple[Record[TrackedEvent], NewEvent]], now: datetime
) -> dict[tuple[str, uuid.UUID], datetime]:
    """Per subscription named by the records: the newest of its events' times, at most now."""
    active: dict[tuple[str, uuid.UUID], datetime] = {}
    for record, event in parsed:
        text = record.value.subscription_id
        if not text:
            continue
        try:
            key = (event.app_id, uuid.UUID(text))
        except ValueError:
            continue  # not from TrackEvents; the event itself is fine
        moment = min(event.occurred_at, now)
        if key not in active or active[key] < moment:
            active[key] = moment
    return active


def _skip(record: Record[TrackedEvent], why: str) -> None:
    log.warning(
        "skipping event %r at %s[%d]@%d: %s",
        record.value.event_id[:128],
        record.topic,
        record.partition,
        record.offset,
        why,
    )


def _new_event(
    record: Record[TrackedEvent], user_ids: dict[str, uuid.UUID | None]
) -> NewEvent | None:
    """The event a record carries, or ``None`` (logged) if it cannot be stored at all.

    Args:
        record: The record.
        user_ids: Parsed user ids of this batch by their text, so each distinct user is parsed
            once per batch.
    """
    value = record.value
    text = value.user_id
    if text in user_ids:
        user_id = user_ids[text]
    else:
        try:
            user_id = user_ids[text] = uuid.UUID(text)
        except ValueError:
            user_id = user_ids[text] = None
    if user_id is None:
        _skip(record, f"user id {text[:64]!r} is not a UUID")
        return None
    event_id, name = value.event_id, value.name
    if not event_id or not name:
        _skip(record, "no event id or name")
        return None
    if "\x00" in event_id or "\x00" in name or "\x00" in value.app_id:
        _skip(record, "NUL character in an id or the name")
        return None
    # Built from integers: cheaper than Timestamp.ToDatetime, and exact to the microsecond.
    receive_time = (
        _from_millis(record.timestamp_ms) if record.timestamp_ms > 0 else datetime.now(UTC)
    )
    occurred_at = receive_time
    if value.HasField("occurred_at"):
        stamp = value.occurred_at
        try:
            occurred_at = _from_timestamp(stamp.seconds, stamp.nanos)
        except OverflowError:
            _skip(record, "occurred_at is out of range")
            return None
    return NewEvent(
        app_id=value.app_id,
        user_id=user_id,
        event_id=event_id,
        name=name,
        properties_json=properties_json(value.properties),
        occurred_at=occurred_at,
        receive_time=receive_time,
    )


async def _current_owners(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
    users: set[tuple[str, uuid.UUID]],
) -> dict[tuple[str, uuid.UUID], uuid.UUID]:
    """For each ``(app_id, user_id)``: the user who owns its events now, if any.

    That is the user itself while it exists, or the profile Login merged it into; users that
    do not exist (another database's, or erased) are left out.
    """
    existing = await events_store.existing_users(conn, users)
    owners = {pair: pair[1] for pair in existing}
    # Follow merges for the rest: pair -> the profile it is being traced through.
    tracing = {pair: pair[1] for pair in users - existing}
    for _ in range(_MERGE_HOPS):
        if not tracing:
            break
        targets = await events_store.merge_targets(
            conn, {(app_id, user_id) for (app_id, _), user_id in tracing.items()}
        )
        if not targets:
            break
        next_hop = {
            pair: targets[(pair[0], user_id)]
            for pair, user_id in tracing.items()
            if (pair[0], user_id) in targets
        }
        alive = await events_store.existing_users(
            conn, {(pair[0], into) for pair, into in next_hop.items()}
        )
        tracing = {}
        for pair, into in next_hop.items():
            if (pair[0], into) in alive:
                owners[pair] = into
            else:
                tracing[pair] = into
    return owners


async def start_time(pool: asyncpg.Pool, now: datetime) -> datetime:
    """Where a new consumer group of this database starts reading a shared topic.

    Records for this database's apps cannot predate its oldest app; without an app yet, none
    predate now. A margin covers clock skew between the database and the producers.
    """
    oldest: datetime | None = await pool.fetchval("SELECT min(create_time) FROM apps")
    return (oldest or now) - _START_MARGIN


# Per process (Metrics object): the runtime restarts a failed background task, and a registry
# refuses a second metric of the same name.
_COUNTERS: weakref.WeakKeyDictionary[Metrics, tuple[Counter, Counter]] = weakref.WeakKeyDictionary()


def _counters(metrics: Metrics) -> tuple[Counter, Counter]:
    if metrics not in _COUNTERS:
        _COUNTERS[metrics] = (
            Counter(
                "identity_events_stored_total",
                "Tracked events stored by the identity.events consumer.",
                registry=metrics.registry,
            ),
            Counter(
                "identity_events_dropped_total",
                "Records of identity.events not stored, by reason (duplicate, unknown_app, "
                "unknown_user, malformed).",
                ["reason"],
                registry=metrics.registry,
            ),
        )
    return _COUNTERS[metrics]


async def run_events_consumer(ctx: ServiceContext) -> None:
    """Background task: consume ``identity.events`` into Postgres until cancelled.

    Args:
        ctx: The service context (pool, settings, clock, metrics).

    Raises:
        HandlerFailedError: Storing a batch kept failing; the runtime restarts the task after a
            backoff (the batch was not committed, so nothing is lost).
    """
    async with ctx.pool.acquire() as conn:
        group_id = group_id_for(await events_store.database_instance_id(conn))
    stored, dropped = _counters(ctx.metrics)
    storer = EventStorer(ctx.pool, clock=ctx.clock, stored=stored, dropped=dropped)
    await storer.prepare()
    await start_new_group_at(
        ctx.settings.kafka_bootstrap,
        IDENTITY_EVENTS.name,
        group_id,
        await start_time(ctx.pool, ctx.clock()),
    )
    consumer = BatchConsumer(
        ctx.settings.kafka_bootstrap,
        IDENTITY_EVENTS,
        storer.handle,
        group_id=group_id,
        service=ctx.settings.service_name,
        client_id=f"{ctx.settings.service_name}-events",
        max_batch=MAX_BATCH,
    )
    try:
        await consumer.run()
    finally:
        await consumer.stop()
