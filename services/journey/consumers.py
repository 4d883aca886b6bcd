"""Journey's consumers of ``identity.events``, ``identity.changes`` and ``delivery.receipts``.

Each handles a polled batch in one transaction that claims the records' event ids in the inbox,
so a redelivered record has no second effect:

* **events**: a customer inside a journey whose goal the event matches converts there (their
  open step closes with ``(goal)``); one waiting for the event (a wait node, or a retargeting
  node's goal event with the same correlation value as their entry event) is woken towards the
  matching output; then active journeys whose entry is this event enter the customer (trigger
  id = the event id). Waits and goals are resolved before entries, so an event never converts
  the visit it starts; a user's events take effect in their order, even in one batch (an
  ``add_to_cart`` enters before the ``purchase`` after it is matched).
* **changes**: a deleted user is forgotten by every journey (GDPR); ``segment entered`` facts
  enter segment journeys (trigger id = the fact's id); created or updated profiles refresh the
  customer's birthday entry timers.
* **receipts**: what delivery reports about a journey's send is recorded once per (send,
  status) for the statistics, and wakes a customer waiting for that send's result or for that
  engagement.

A woken customer gets ``pending_output`` and is due now; while their journey is paused the
wake is parked instead, and taken on Resume.

Consumer groups are ``journey.<purpose>.<database id>`` (replicas of one database share them).
A group with no committed offsets starts at the records produced shortly before the database's
first journey (nothing older can concern it), or at the end of the topic when there is none.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import google.protobuf.message
from tidings.events.v1.delivery_receipt_pb2 import DeliveryReceipt
from tidings.events.v1.identity_change_pb2 import IdentityChange
from tidings.events.v1.tracked_event_pb2 import TrackedEvent
from tidings.journey.v1 import journey_pb2 as jpb

from services.journey import instances_store
from services.journey.audience import birthday_timers, upsert_birthday_timers
from services.journey.conditions import matches_properties, struct_dict
from services.journey.definitions import node_kind
from services.journey.engine import ENGAGEMENT_STATUSES, _entry_time, journey_states
from services.journey.entries import Candidate, enter
from services.journey.instances_store import Instance, StepRow
from services.journey.peers import PeerRefused, PeerUnavailable
from services.runtime.app import ServiceContext
from services.runtime.db import DBConnection
from services.runtime.inbox import claim_new
from services.runtime.kafka import (
    DELIVERY_RECEIPTS,
    IDENTITY_CHANGES,
    IDENTITY_EVENTS,
    BatchConsumer,
    Record,
    Topic,
    start_new_group_at,
)

if TYPE_CHECKING:
    from services.journey.server import JourneyRuntime

__all__ = [
    "ChangesHandler",
    "EventsHandler",
    "ReceiptsHandler",
    "run_changes_consumer",
    "run_events_consumer",
    "run_receipts_consumer",
]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=google.protobuf.message.Message)

_START_MARGIN = timedelta(seconds=10)
#: Receipts counted in the statistics (queued and sent only teach message ids).
_RECEIPT_STATUSES = {
    DeliveryReceipt.STATUS_DELIVERED: "delivered",
    DeliveryReceipt.STATUS_OPENED: "opened",
    DeliveryReceipt.STATUS_CLICKED: "clicked",
    DeliveryReceipt.STATUS_FAILED: "failed",
    DeliveryReceipt.STATUS_BOUNCED: "bounced",
}


def _uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def _wake(inst: Instance, output: str, now: datetime, paused: bool) -> None:
    inst.pending_output = output
    if paused or inst.parked_wake_at is not None:
        inst.parked_wake_at, inst.wake_at = now, None
    else:
        inst.wake_at = now


async def _live_apps(runtime: JourneyRuntime) -> set[str]:
    return {app_id for app_id, _ in await runtime.catalog.live()}


#: How often a batch of events starts over when a user entered a journey while it was read.
_LATE_ENTRY_ATTEMPTS = 5


class _LateEntry(Exception):
    """A user entered a journey between reading their journeys and locking their rows."""


class EventsHandler:
    """Tracked events: goals, waits, retargeting, event entries."""

    def __init__(self, runtime: JourneyRuntime, ctx: ServiceContext) -> None:
        self._runtime = runtime
        self._ctx = ctx

    async def handle(self, records: Sequence[Record[TrackedEvent]]) -> None:
        """Apply a batch (idempotent), each user's events in their order."""
        apps = await _live_apps(self._runtime)
        events = [r.value for r in records if r.value.app_id in apps and _uuid(r.value.user_id)]
        if not events:
            return
        live = await self._runtime.catalog.live()
        now = self._ctx.clock()
        for attempt in range(_LATE_ENTRY_ATTEMPTS):
            try:
                async with self._ctx.pool.acquire() as conn, conn.transaction():
                    fresh = await claim_new(conn, "journey.events", [e.event_id for e in events])
                    fresh_events = [e for e in events if e.event_id in fresh]
                    for round_events in _rounds(fresh_events, _entry_events(live)):
                        await self._resolve(conn, round_events, now)
                        await self._enter(conn, round_events, live, now)
                break
            except _LateEntry:
                if attempt == _LATE_ENTRY_ATTEMPTS - 1:
                    raise  # the consumer retries the batch
        self._runtime.engine.nudge()

    async def _resolve(
        self, conn: DBConnection, events: Sequence[TrackedEvent], now: datetime
    ) -> None:
        """Goals and waits of the customers these events' users are inside, in event order."""
        catalog = self._runtime.catalog
        pairs = sorted({(e.app_id, uuid.UUID(e.user_id)) for e in events})
        # The journeys' rows before the customers' rows, the order Pause/Stop/Put lock in: the
        # other way round, each would wait for the other.
        states = await journey_states(conn, await instances_store.journeys_of_users(conn, pairs))
        inside = await instances_store.lock_inside_of_users(conn, pairs)
        if {(i.app_id, i.journey_id) for i in inside} - states.keys():
            # Entered between the two reads (rare): locking that journey now would take it after
            # its customers, and a Stop holding it while waiting for them would deadlock us.
            raise _LateEntry
        by_user: dict[tuple[str, uuid.UUID], list[Instance]] = {}
        for inst in inside:
            by_user.setdefault((inst.app_id, inst.user_id), []).append(inst)
        changed: dict[tuple[uuid.UUID, uuid.UUID], Instance] = {}
        steps: list[StepRow] = []
        for event in events:
            properties = struct_dict(event.properties)
            for inst in by_user.get((event.app_id, uuid.UUID(event.user_id)), []):
                if not inst.inside:
                    continue
                definition = await catalog.definition(inst.app_id, inst.journey_id, inst.version)
                paused = states.get((inst.app_id, inst.journey_id)) == "paused"
                if _is_goal(definition, event.name, properties, now):
                    steps.append(_close(inst, "(goal)", now))
                    inst.status, inst.exit_time = "converted", now
                    inst.wake_at = inst.parked_wake_at = None
                    inst.waiting_for, inst.pending_output = "", ""
                    changed[(inst.journey_id, inst.user_id)] = inst
                    continue
                output = _awaited(definition, inst, event.name, properties, now)
                if output:
                    _wake(inst, output, now, paused)
                    changed[(inst.journey_id, inst.user_id)] = inst
        await instances_store.save_instances(conn, list(changed.values()))
        await instances_store.upsert_steps(conn, steps)

    async def _enter(
        self,
        conn: DBConnection,
        events: Sequence[TrackedEvent],
        live: dict[Any, Any],
        now: datetime,
    ) -> None:
        entries: dict[tuple[str, uuid.UUID], list[Candidate]] = {}
        for event in events:
            properties: dict[str, Any] | None = None
            for (app_id, journey_id), journey in live.items():
                if app_id != event.app_id or journey.state != "active":
                    continue
                entry = journey.definition.entry
                if entry.WhichOneof("kind") != "event" or entry.event.name != event.name:
                    continue
                if properties is None:
                    properties = struct_dict(event.properties)
                if matches_properties(entry.event.where, properties, now):
                    entries.setdefault((app_id, journey_id), []).append(
                        Candidate(uuid.UUID(event.user_id), event.event_id, properties)
                    )
        for (app_id, journey_id), candidates in entries.items():
            await enter(
                conn,
                app_id,
                journey_id,
                self._runtime.catalog.definition,
                candidates,
                now,
                stepper=self._runtime.engine.step_entered,
            )


def _entry_events(live: dict[Any, Any]) -> set[tuple[str, str]]:
    """(app, event name) of every active journey entered on a custom event."""
    return {
        (app_id, journey.definition.entry.event.name)
        for (app_id, _), journey in live.items()
        if journey.state == "active" and journey.definition.entry.WhichOneof("kind") == "event"
    }


def _rounds(
    events: Sequence[TrackedEvent], entering: set[tuple[str, str]]
) -> list[list[TrackedEvent]]:
    """The batch cut so that each user's events take effect in their order.

    A user's events are cut after each one that may enter a journey: what follows it (a
    ``purchase`` after the ``add_to_cart`` that started a retargeting visit) must find the
    customer inside. Round k holds every user's k-th piece; most batches are one round.
    """
    pieces: dict[tuple[str, str], list[list[TrackedEvent]]] = {}
    for event in events:
        user = pieces.setdefault((event.app_id, event.user_id), [[]])
        user[-1].append(event)
        if (event.app_id, event.name) in entering:
            user.append([])
    rounds: list[list[TrackedEvent]] = []
    for user in pieces.values():
        for k, piece in enumerate(p for p in user if p):
            if k == len(rounds):
                rounds.append([])
            rounds[k].extend(piece)
    return rounds


def _is_goal(
    definition: jpb.JourneyDefinition, name: str, properties: dict[str, Any], now: datetime
) -> bool:
    goal = definition.goal
    return (
        bool(goal.event_name)
        and goal.event_name == name
        and matches_properties(goal.where, properties, now)
    )


def _awaited(
    definition: jpb.JourneyDefinition,
    inst: Instance,
    name: str,
    properties: dict[str, Any],
    now: datetime,
) -> str:
    """The output an event takes a waiting customer to, or ``""``."""
    if inst.status != "waiting" or inst.pending_output:
        return ""
    node = next((n for n in definition.nodes if n.node_id == inst.node_id), None)
    if node is None:
        return ""
    kind = node_kind(node)
    if kind == "wait_for_event" and node.wait_for_event.WhichOneof("awaited") == "event":
        awaited = node.wait_for_event.event
        if awaited.name == name and matches_properties(awaited.where, properties, now):
            return "event"
    if kind == "retarget" and node.retarget.goal_event == name:
        key = node.retarget.correlation_property
        expected = inst.trigger_properties.get(key)
        if expected is not None and properties.get(key) == expected:
            return "converted"
    return ""


def _close(inst: Instance, output: str, now: datetime) -> StepRow:
    return StepRow(
        inst.app_id,
        inst.journey_id,
        inst.user_id,
        inst.visit,
        inst.seq,
        inst.node_id,
        output,
        inst.node_enter_time,
        now,
    )


class ChangesHandler:
    """Identity's change feed: erasure, segment entries, birthday timers."""

    def __init__(self, runtime: JourneyRuntime, ctx: ServiceContext) -> None:
        self._runtime = runtime
        self._ctx = ctx

    async def handle(self, records: Sequence[Record[IdentityChange]]) -> None:
        """Apply a batch (idempotent)."""
        catalog = self._runtime.catalog
        live = await catalog.live()
        now = self._ctx.clock()
        Kind = IdentityChange.Kind
        birthdays = {
            key: j for key, j in live.items() if j.state == "active" and j.entry_kind == "birthday"
        }
        # Only changes something here depends on take a transaction and an inbox row: identity
        # publishes every change of every app, most of them of no journey's concern.
        entered_segments = {
            (j.app_id, j.definition.entry.segment.segment_id)
            for j in live.values()
            if j.state == "active" and j.entry_kind == "segment"
        }
        birthday_apps = {app for app, _ in birthdays}
        changes = [
            c
            for c in (r.value for r in records)
            if _uuid(c.user_id)
            and (
                c.kind == Kind.KIND_USER_DELETED
                or (
                    c.kind == Kind.KIND_SEGMENT_ENTERED
                    and (c.app_id, c.segment_id) in entered_segments
                )
                or c.app_id in birthday_apps
            )
        ]
        if not changes:
            return
        profile_changes = [
            c
            for c in changes
            if c.kind in (Kind.KIND_USER_CREATED, Kind.KIND_USER_MERGED)
            or (
                c.kind == Kind.KIND_USER_UPDATED
                and {"birthdate", "timezone"} & set(c.changed_fields)
            )
        ]
        profiles: dict[uuid.UUID, Any] = {}
        zones: dict[str, str] = {}
        for app_id in {c.app_id for c in profile_changes} & birthday_apps:
            ids = [uuid.UUID(c.user_id) for c in profile_changes if c.app_id == app_id]
            try:
                profiles.update(await self._runtime.peers.get_users(app_id, ids))
                zones[app_id] = await self._runtime.peers.default_zone(app_id)
            except (PeerUnavailable, PeerRefused) as exc:
                # Retried by the consumer (the batch is not committed); an outage passes.
                raise RuntimeError(f"identity could not give profiles: {exc}") from exc
        async with self._ctx.pool.acquire() as conn, conn.transaction():
            fresh = await claim_new(conn, "journey.changes", [c.event_id for c in changes])
            changes = [c for c in changes if c.event_id in fresh]
            for change in changes:
                if change.kind == Kind.KIND_USER_DELETED:
                    await instances_store.purge_user(conn, change.app_id, uuid.UUID(change.user_id))
            entries: dict[tuple[str, uuid.UUID], list[Candidate]] = {}
            for change in changes:
                if change.kind != Kind.KIND_SEGMENT_ENTERED:
                    continue
                for (app_id, journey_id), journey in live.items():
                    entry = journey.definition.entry
                    if (
                        app_id == change.app_id
                        and journey.state == "active"
                        and entry.WhichOneof("kind") == "segment"
                        and entry.segment.segment_id == change.segment_id
                    ):
                        entries.setdefault((app_id, journey_id), []).append(
                            Candidate(uuid.UUID(change.user_id), f"segment:{change.event_id}")
                        )
            for (app_id, journey_id), candidates in entries.items():
                await enter(
                    conn,
                    app_id,
                    journey_id,
                    catalog.definition,
                    candidates,
                    now,
                    stepper=self._runtime.engine.step_entered,
                )
            fresh_profiles = {uuid.UUID(c.user_id) for c in profile_changes if c.event_id in fresh}
            for (app_id, journey_id), journey in birthdays.items():
                users = [
                    profiles[u]
                    for u in fresh_profiles
                    if u in profiles and profiles[u].user_id and app_id in birthday_apps
                ]
                users = [u for u in users if _app_of(u, profile_changes) == app_id]
                birthday = journey.definition.entry.birthday
                timers = birthday_timers(
                    users, birthday.days_offset, _entry_time(birthday), now, zones.get(app_id, "")
                )
                await upsert_birthday_timers(conn, app_id, journey_id, timers)
        if entries:
            self._runtime.engine.nudge()


def _app_of(user: Any, changes: Sequence[IdentityChange]) -> str:
    return next((c.app_id for c in changes if c.user_id == user.user_id), "")


class ReceiptsHandler:
    """Delivery receipts of journey sends: statistics and waits."""

    def __init__(self, runtime: JourneyRuntime, ctx: ServiceContext) -> None:
        self._runtime = runtime
        self._ctx = ctx

    async def handle(self, records: Sequence[Record[DeliveryReceipt]]) -> None:
        """Apply a batch (idempotent)."""
        receipts = [
            r.value
            for r in records
            if _uuid(r.value.user_id)
            and (r.value.journey_id or r.value.status in _RECEIPT_STATUSES)
            and (not r.value.journey_id or _uuid(r.value.journey_id))
        ]
        if not receipts:
            return
        now = self._ctx.clock()
        changed: dict[tuple[uuid.UUID, uuid.UUID], Instance] = {}
        async with self._ctx.pool.acquire() as conn, conn.transaction():
            fresh = await claim_new(conn, "journey.receipts", [r.event_id for r in receipts])
            receipts = [r for r in receipts if r.event_id in fresh]
            receipts = await _with_journey(conn, receipts)
            if not receipts:
                return
            counted = [r for r in receipts if r.status in _RECEIPT_STATUSES]
            # The journeys' rows before the customers' rows (the order of Pause/Stop/Put).
            states = await journey_states(
                conn, {(r.app_id, uuid.UUID(r.journey_id)) for r in counted}
            )
            await conn.execute(
                """
                INSERT INTO send_receipts (app_id, idempotency_key, status, journey_id, node_id,
                                           user_id, occurred_at)
                SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::uuid[], $5::text[],
                                     $6::uuid[], $7::timestamptz[])
                ON CONFLICT DO NOTHING
                """,
                [r.app_id for r in counted],
                [r.idempotency_key for r in counted],
                [_RECEIPT_STATUSES[r.status] for r in counted],
                [uuid.UUID(r.journey_id) for r in counted],
                [r.journey_node_id for r in counted],
                [uuid.UUID(r.user_id) for r in counted],
                [_occurred(r, now) for r in counted],
            )
            for receipt in counted:
                journey_id, user_id = uuid.UUID(receipt.journey_id), uuid.UUID(receipt.user_id)
                found = await instances_store.lock_instances(
                    conn, receipt.app_id, journey_id, [user_id]
                )
                inst = changed.get((journey_id, user_id)) or found.get(user_id)
                if inst is None or inst.status != "waiting" or inst.pending_output:
                    continue
                output = _receipt_output(inst, receipt)
                if not output:
                    continue
                _wake(inst, output, now, states.get((receipt.app_id, journey_id)) == "paused")
                changed[(journey_id, user_id)] = inst
            await instances_store.save_instances(conn, list(changed.values()))
        if changed:
            self._runtime.engine.nudge()


async def _with_journey(
    conn: DBConnection, receipts: list[DeliveryReceipt]
) -> list[DeliveryReceipt]:
    """The receipts of this database's journey sends, each naming its journey, node and key.

    A receipt that names them (delivery's worker writes them on queued/sent/delivered/failed)
    teaches the send's message id; one that names only the message id (an open or a click
    reported later) is completed from what was learnt. Receipts of other deployments' sends
    (the topic is shared) are dropped.
    """
    naming = [r for r in receipts if r.journey_id and r.idempotency_key and r.message_id]
    journeys = {
        row["journey_id"]
        for row in await conn.fetch(
            "SELECT journey_id FROM journeys WHERE journey_id = ANY($1::uuid[])",
            list({uuid.UUID(r.journey_id) for r in receipts if r.journey_id}),
        )
    }
    naming = [r for r in naming if uuid.UUID(r.journey_id) in journeys]
    if naming:
        await conn.execute(
            """
            INSERT INTO send_messages (app_id, message_id, idempotency_key, journey_id, node_id,
                                       user_id)
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::uuid[], $5::text[],
                                 $6::uuid[])
            ON CONFLICT DO NOTHING
            """,
            [r.app_id for r in naming],
            [r.message_id for r in naming],
            [r.idempotency_key for r in naming],
            [uuid.UUID(r.journey_id) for r in naming],
            [r.journey_node_id for r in naming],
            [uuid.UUID(r.user_id) for r in naming],
        )
    anonymous = [r for r in receipts if not r.journey_id and r.message_id]
    learnt: dict[tuple[str, str], Any] = {}
    if anonymous:
        rows = await conn.fetch(
            """
            SELECT m.* FROM send_messages m
            JOIN unnest($1::text[], $2::text[]) AS k(app_id, message_id)
              ON m.app_id = k.app_id AND m.message_id = k.message_id
            """,
            [r.app_id for r in anonymous],
            [r.message_id for r in anonymous],
        )
        learnt = {(row["app_id"], row["message_id"]): row for row in rows}
    result = []
    for receipt in receipts:
        if receipt.journey_id:
            if uuid.UUID(receipt.journey_id) in journeys and receipt.idempotency_key:
                result.append(receipt)
            continue
        row = learnt.get((receipt.app_id, receipt.message_id))
        if row is None:
            continue
        completed = DeliveryReceipt()
        completed.CopyFrom(receipt)
        completed.journey_id = str(row["journey_id"])
        completed.journey_node_id = row["node_id"]
        completed.idempotency_key = row["idempotency_key"]
        result.append(completed)
    return result


def _occurred(receipt: DeliveryReceipt, now: datetime) -> datetime:
    if receipt.HasField("occurred_at"):
        return receipt.occurred_at.ToDatetime(tzinfo=UTC)
    return now


def _receipt_output(inst: Instance, receipt: DeliveryReceipt) -> str:
    status = _RECEIPT_STATUSES[receipt.status]
    if inst.waiting_for == f"result:{receipt.idempotency_key}":
        return "failed" if status in ("failed", "bounced") else "delivered"
    if inst.waiting_for.startswith("engagement:"):
        _, node_id, kind = inst.waiting_for.split(":", 2)
        same_visit = receipt.idempotency_key.startswith(
            f"{inst.journey_id}/{inst.user_id}/{inst.visit}/"
        )
        wanted = {
            "delivered": ENGAGEMENT_STATUSES[jpb.Engagement.KIND_DELIVERED],
            "opened": ENGAGEMENT_STATUSES[jpb.Engagement.KIND_OPENED],
            "clicked": ENGAGEMENT_STATUSES[jpb.Engagement.KIND_CLICKED],
        }[kind]
        if receipt.journey_node_id == node_id and same_visit and status in wanted:
            return "event"
    return ""


# -- running them --------------------------------------------------------------------------------


async def _group_start(ctx: ServiceContext) -> datetime:
    """Where a new consumer group of this database starts: nothing before its first journey
    (nor, without one, before now) can be for it."""
    first: datetime | None = await ctx.pool.fetchval("SELECT min(create_time) FROM journeys")
    now = datetime.now(UTC)
    # Journeys are stamped by the engine's (maybe shifted) clock; Kafka by the real one.
    start = first - (ctx.clock() - now) if first is not None else now
    return start - _START_MARGIN


async def _consume(
    runtime: JourneyRuntime,
    ctx: ServiceContext,
    topic: Topic[M],
    purpose: str,
    handler: Any,
) -> None:
    runtime.ready()
    instance = str(await ctx.pool.fetchval("SELECT id FROM outbox_instance"))
    group_id = f"journey.{purpose}.{instance}"
    await start_new_group_at(
        ctx.settings.kafka_bootstrap, topic.name, group_id, await _group_start(ctx)
    )
    consumer = BatchConsumer(
        ctx.settings.kafka_bootstrap,
        topic,
        handler,
        group_id=group_id,
        service=ctx.settings.service_name,
        client_id=f"{ctx.settings.service_name}-{purpose}",
        max_batch=1000,
    )
    log.info("consumer %s of %s started", purpose, topic.name)
    try:
        await consumer.run()
    finally:
        await consumer.stop()


async def run_events_consumer(runtime: JourneyRuntime, ctx: ServiceContext) -> None:
    """Background task: ``identity.events``."""
    await _consume(runtime, ctx, IDENTITY_EVENTS, "events", EventsHandler(runtime, ctx).handle)


async def run_changes_consumer(runtime: JourneyRuntime, ctx: ServiceContext) -> None:
    """Background task: ``identity.changes``."""
    await _consume(runtime, ctx, IDENTITY_CHANGES, "changes", ChangesHandler(runtime, ctx).handle)


async def run_receipts_consumer(runtime: JourneyRuntime, ctx: ServiceContext) -> None:
    """Background task: ``delivery.receipts``."""
    await _consume(
        runtime, ctx, DELIVERY_RECEIPTS, "receipts", ReceiptsHandler(runtime, ctx).handle
    )
