"""Keeps segment membership up to date: a background task of every identity replica.

Every change that can move a user into or out of a segment queues the user in
``segment_dirty_users`` in the change's own transaction (``changes.publish`` for profile,
subscription and merge facts; the events consumer for stored events). The maintainer:

1. wakes on ``NOTIFY tidings_segments`` (sent at the commit of a mark), or every
   ``segment_poll_seconds`` as a fallback;
2. claims up to ``segment_batch_size`` marks, oldest first (``FOR UPDATE SKIP LOCKED``, so
   replicas share the queue), and per app, in one transaction with the claim:
   locks the app's DYNAMIC segments (``FOR NO KEY UPDATE``, in id order: one writer of a
   segment's members at a time, the same lock a materialisation takes); then in one statement
   (one per level of ``member_of`` dependencies, so a segment sees the new members of those
   it names) reads the batch's users once, runs every segment's condition over them
   (``WHERE user_id = ANY($batch) AND <condition>``) and applies the differences: members in
   and out, closed periods to the history, ``SEGMENT_ENTERED`` / ``SEGMENT_EXITED`` facts to
   the outbox; the memberships of users that no longer exist are forgotten;
3. commits: the marks are deleted with the result, so a crash before the commit loses nothing
   (the marks are claimed again) and publishes nothing (the outbox rows roll back with it).
   Evaluation reads the latest committed state after the locks are taken, so a mark processed
   late or twice gives the same answer.

Time-relative segments ("in the last 7 days", birthdays) are re-checked every
``segment_refresh_seconds``: a set-based comparison of who matches now with who is a member
queues the users that differ, and step 2 moves them with the usual rules and facts. The same
sweep finishes a materialisation that a crashed CreateSegment / UpdateSegment left pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
import weakref
from collections.abc import Sequence
from datetime import datetime

import asyncpg
from prometheus_client import Counter, Histogram

from services.identity import segments, segments_store
from services.identity.segment_sql import Scope, SqlParams, compile_condition
from services.identity.segments_store import SegmentRecord
from services.runtime.app import Clock, ServiceContext
from services.runtime.db import DBConnection
from services.runtime.metrics import Metrics

__all__ = [
    "CHANNEL",
    "PENDING_GRACE_SECONDS",
    "SegmentMaintainer",
    "dependency_levels",
    "reevaluate",
    "run_segment_maintainer",
]

log = logging.getLogger(__name__)

#: Channel the dirty-queue trigger notifies (migration 0006).
CHANNEL = "tidings_segments"
#: A materialisation pending this long was abandoned by its caller (a crash): the sweep does it.
PENDING_GRACE_SECONDS = 60.0
_ATTEMPTS = 5
_RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)


def dependency_levels(records: Sequence[SegmentRecord]) -> list[list[SegmentRecord]]:
    """The segments in levels: each level refers only to segments of earlier levels (or to
    none of these), so a level is evaluated in one statement, after the levels it reads.

    Cycles cannot be saved (validation refuses them); should one exist anyway, its segments
    land in one level rather than loop.
    """
    by_id = {record.segment_id: record for record in records}
    level: dict[uuid.UUID, int] = {}

    def depth(record: SegmentRecord, seen: frozenset[uuid.UUID]) -> int:
        if record.segment_id in level:
            return level[record.segment_id]
        targets = [by_id[t] for t in record.refers_to if t in by_id and t not in seen]
        found = 1 + max((depth(t, seen | {record.segment_id}) for t in targets), default=-1)
        level[record.segment_id] = found
        return found

    for record in records:
        depth(record, frozenset())
    levels: list[list[SegmentRecord]] = [[] for _ in range(1 + max(level.values(), default=0))]
    for record in sorted(records, key=lambda r: r.segment_id):
        levels[level[record.segment_id]].append(record)
    return levels


async def reevaluate(
    conn: DBConnection, app_id: str, user_ids: Sequence[uuid.UUID], *, at: datetime
) -> tuple[int, int]:
    """Re-evaluate users against every DYNAMIC segment of their app and apply the result.

    Call it in a transaction (the one that claimed their marks). One statement per level of
    dependencies (usually one in all): the users are read once, every segment's condition
    runs over them, and entries, exits, history and facts are written together.

    Returns:
        Entries and exits published.
    """
    # The statements are the same for every batch of the app (the users are a parameter):
    # their generic plans (index lookups by user, partitions pruned at run time) are right
    # for any batch, and planning them anew each time would cost more than running them.
    await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
    locked = await segments_store.lock_dynamic_segments(conn, app_id)
    if not locked and not await segments_store.has_segments(conn, app_id):
        return 0, 0  # most marks of an app without segments: nothing to evaluate or purge
    batch = list(user_ids)
    entered = exited = 0
    for depth, level in enumerate(dependency_levels(locked)):
        params = SqlParams([app_id, at, batch])
        evaluations = [
            (
                record,
                compile_condition(
                    segments.segment_condition(record),
                    app_id=app_id,
                    now=at,
                    scope=Scope.BATCH,
                    batch=batch,
                    params=params,
                ).sql,
            )
            for record in level
        ]
        delta = await segments_store.reevaluate_batch(
            conn, app_id, evaluations, params, at=at, purge=depth == 0
        )
        entered += delta.entered
        exited += delta.exited
    return entered, exited


# Per process (Metrics object): the runtime restarts a failed task, and a registry refuses a
# second metric of the same name.
_METRICS: weakref.WeakKeyDictionary[Metrics, tuple[Histogram, Counter]] = (
    weakref.WeakKeyDictionary()
)


def _metrics(metrics: Metrics) -> tuple[Histogram, Counter]:
    if metrics not in _METRICS:
        _METRICS[metrics] = (
            Histogram(
                "identity_segment_lag_seconds",
                "From a change's commit (its dirty mark) to the commit of the membership change.",
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                registry=metrics.registry,
            ),
            Counter(
                "identity_segment_changes_total",
                "Segment entries and exits published by the maintainer, by kind.",
                ["kind"],
                registry=metrics.registry,
            ),
        )
    return _METRICS[metrics]


class SegmentMaintainer:
    """Drains the dirty-user queue and re-checks time-relative segments (see module doc).

    Args:
        pool: The identity database.
        clock: Current time.
        batch_size: Most marks per transaction.
        refresh_seconds: Interval of the time-relative re-check.
        poll_seconds: Wait for a NOTIFY before looking anyway.
        metrics: Process metrics, if wanted.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        clock: Clock,
        batch_size: int,
        refresh_seconds: float,
        poll_seconds: float,
        metrics: Metrics | None = None,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._batch_size = batch_size
        self._refresh_seconds = refresh_seconds
        self._poll_seconds = poll_seconds
        self._lag: Histogram | None = None
        self._changes: Counter | None = None
        if metrics is not None:
            self._lag, self._changes = _metrics(metrics)
        self._wake = asyncio.Event()

    def _notified(self, *_: object) -> None:
        self._wake.set()

    async def run(self, database_url: str) -> None:
        """Maintain until cancelled; a lost LISTEN connection raises (the runtime restarts).

        Draining and the schedule run side by side: a re-check of a big time-relative segment
        (a second or so over a million users) never holds up the changes waiting meanwhile.
        """
        lost = asyncio.Event()
        listener: asyncpg.Connection = await asyncpg.connect(database_url)
        sweeper = asyncio.create_task(self._sweep_forever(), name="segment-sweep")
        try:
            listener.add_termination_listener(lambda _: lost.set())
            await listener.add_listener(CHANNEL, self._notified)
            while not lost.is_set():
                if sweeper.done():
                    sweeper.result()  # re-raise what ended it
                self._wake.clear()
                while await self.drain_once():
                    pass
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll_seconds)
            raise ConnectionError("the LISTEN connection of the segment maintainer was lost")
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            listener.terminate()

    async def _sweep_forever(self) -> None:
        interval = min(self._refresh_seconds, PENDING_GRACE_SECONDS)
        while True:
            await self.sweep()
            await asyncio.sleep(interval)

    async def drain_once(self) -> bool:
        """Process one batch of marks; True if the batch was full (more may be waiting)."""
        for attempt in range(_ATTEMPTS):
            try:
                return await self._drain_once()
            except _RETRYABLE:
                if attempt == _ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        return False

    async def _drain_once(self) -> bool:
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                claimed = await segments_store.claim_dirty(conn, self._batch_size)
                if not claimed:
                    return False
                at = self._clock()
                by_app: dict[str, set[uuid.UUID]] = {}
                for mark in claimed:
                    by_app.setdefault(mark.app_id, set()).add(mark.user_id)
                entered = exited = 0
                for app_id in sorted(by_app):
                    ins, outs = await reevaluate(conn, app_id, sorted(by_app[app_id]), at=at)
                    entered += ins
                    exited += outs
            done = self._clock()
        if self._lag is not None and self._changes is not None:
            for mark in claimed:
                self._lag.observe(max(0.0, (done - mark.mark_time).total_seconds()))
            self._changes.labels("entered").inc(entered)
            self._changes.labels("exited").inc(exited)
        return len(claimed) >= self._batch_size

    async def sweep(self) -> None:
        """Finish abandoned materialisations; queue users whom time moved in or out."""
        now = self._clock()
        async with self._pool.acquire() as conn:
            due = await segments_store.segments_due(
                conn,
                now=now,
                refresh_seconds=self._refresh_seconds,
                pending_grace_seconds=PENDING_GRACE_SECONDS,
            )
            for record in due:
                try:
                    await self._sweep_one(conn, record)
                except _RETRYABLE:
                    log.warning("segment %s re-check conflicted; next sweep", record.segment_id)

    async def _sweep_one(self, conn: DBConnection, record: SegmentRecord) -> None:
        now = self._clock()
        if record.materialise_time is None:
            log.info("finishing the materialisation of segment %s", record.segment_id)
            await segments.materialise(conn, record, at=now)
            return
        if not await segments_store.claim_refresh(
            conn, record, now=now, refresh_seconds=self._refresh_seconds
        ):
            return  # another replica does it
        compiled = compile_condition(
            segments.segment_condition(record), app_id=record.app_id, now=now, scope=Scope.ALL
        )
        async with conn.transaction():
            queued = await segments_store.mark_changed(conn, record, compiled)
        if queued:
            log.info("time moved %d user(s) of segment %s", queued, record.segment_id)


async def run_segment_maintainer(ctx: ServiceContext) -> None:
    """Background task: keep segment membership up to date until cancelled."""
    settings = ctx.settings
    maintainer = SegmentMaintainer(
        ctx.pool,
        clock=ctx.clock,
        batch_size=int(getattr(settings, "segment_batch_size", 500)),
        refresh_seconds=float(getattr(settings, "segment_refresh_seconds", 60.0)),
        poll_seconds=float(getattr(settings, "segment_poll_seconds", 1.0)),
        metrics=ctx.metrics,
    )
    await maintainer.run(settings.database_url)
