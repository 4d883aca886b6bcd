"""The audience loader: enters an activation's audience page by page, as a resumable job.

Activating a journey whose entry is all contacts, a segment (unless ``only_future_members``),
or a birthday creates an ``audience_jobs`` row. A job waits for the definition's
``entry_start_time`` (its ``retry_at``): entered before, the audience would only be refused.
Loaders (one per replica) claim unfinished jobs with ``FOR UPDATE SKIP LOCKED`` and work through
them one page at a time, each page in one transaction with the job's progress:

* all contacts: identity's ListUsers pages (1,000 users, ids only, the next one asked for while
  the current one is stored); each page is stored in ``audience_pages`` in the transaction that
  moves the job's cursor (the page token), so a crash resumes at the page after the last stored
  one. Page workers of every replica (:data:`PAGE_WORKERS` each) claim stored pages with SKIP
  LOCKED and enter them, so one activation is entered by several transactions at once; the
  reader stays at most :data:`PAGES_AHEAD` pages ahead. Memory holds two pages, whatever the
  audience's size.
* segment: identity streams the members in user id order (ListSegmentMembers); each 1,000 are
  entered in one transaction with the job's cursor, the last user id entered, and the next
  page is asked for after it (``after_user_id``): a crash resumes after the last page
  committed, not from the start, and members joining or leaving meanwhile shift nothing.
  Entries are recognised by their trigger id (``activation:<version>``) anyway.
* birthday: ListUsers pages as for all contacts; each customer with a birthdate gets an entry
  timer at their next birthday entry in their time zone (see :mod:`services.journey.schedule`).

A job whose pages identity refuses for now (down, no key yet) is retried after a delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from tidings.identity.v1 import user_pb2

from services.journey import schedule
from services.journey.engine import BUSY, _entry_time, journey_states
from services.journey.entries import ENTERED, Candidate, enter
from services.journey.peers import PeerRefused, PeerUnavailable
from services.runtime.app import ServiceContext

if TYPE_CHECKING:
    from services.journey.server import JourneyRuntime

__all__ = ["AudienceLoader", "birthday_timers", "run_audience_loader"]

log = logging.getLogger(__name__)

PAGE_SIZE = 1000
#: Pages of an all-contacts audience entered at once by each process.
PAGE_WORKERS = 2
#: Pages read ahead of the page workers, at most (bounded memory in the database too).
PAGES_AHEAD = 8
RETRY_AFTER = timedelta(seconds=5)
_IDLE_SECONDS = 0.5


def birthday_timers(
    users: Sequence[user_pb2.User],
    days_offset: int,
    at_hour: Any,
    now: datetime,
    default_zone: str = "",
) -> list[tuple[uuid.UUID, datetime, str, int, int, str]]:
    """``(user, due, trigger, month, day, zone)`` of the customers who have a birthdate.

    The due time is in the customer's zone, else ``default_zone`` (the app's); the stored zone
    is the customer's own (empty without one), so later years use the app's default of then.
    """
    timers = []
    for user in users:
        if not user.HasField("birthdate") or not user.birthdate.month or not user.birthdate.day:
            continue
        zone = schedule.zone_of(user.timezone or default_zone)
        due, year = schedule.birthday_entry(
            now, zone, user.birthdate.month, user.birthdate.day, days_offset, at_hour
        )
        timers.append(
            (
                uuid.UUID(user.user_id),
                due,
                f"birthday:{year}",
                user.birthdate.month,
                user.birthdate.day,
                user.timezone,
            )
        )
    return timers


async def upsert_birthday_timers(
    conn: Any,
    app_id: str,
    journey_id: uuid.UUID,
    timers: Sequence[tuple[uuid.UUID, datetime, str, int, int, str]],
) -> None:
    """Store (or move) customers' next birthday entries."""
    if not timers:
        return
    columns = list(zip(*timers, strict=True))
    await conn.execute(
        """
        INSERT INTO entry_timers (app_id, journey_id, user_id, due_at, trigger_id, birth_month,
                                  birth_day, timezone)
        SELECT $1, $2, t.user_id, t.due_at, t.trigger_id, t.month, t.day, t.zone
        FROM unnest($3::uuid[], $4::timestamptz[], $5::text[], $6::smallint[], $7::smallint[],
                    $8::text[]) AS t(user_id, due_at, trigger_id, month, day, zone)
        ON CONFLICT (app_id, journey_id, user_id) DO UPDATE SET
            due_at = excluded.due_at, birth_month = excluded.birth_month,
            birth_day = excluded.birth_day, timezone = excluded.timezone,
            -- A birthday already entered this year stays entered (same trigger id).
            trigger_id = excluded.trigger_id
        """,
        app_id,
        journey_id,
        *(list(c) for c in columns),
    )


class _Busy(Exception):
    """The journey's row is held by a lifecycle change: try the job again later."""


class AudienceLoader:
    """Works through audience jobs."""

    def __init__(self, runtime: JourneyRuntime, ctx: ServiceContext) -> None:
        self._runtime = runtime
        self._ctx = ctx
        # The next page, asked of identity while the current one is being entered.
        self._next: (
            tuple[tuple[str, str, bool], asyncio.Task[tuple[list[user_pb2.User], str]]] | None
        )
        self._next = None
        # Pages stored (wakes this process's page workers) and entered (wakes its reader, which
        # stops PAGES_AHEAD pages ahead): without them each side sleeps a whole idle wait
        # whenever it catches up with the other, and an activation moves in fits and starts.
        self._stored = asyncio.Event()
        self._entered = asyncio.Event()

    async def _page(
        self, app_id: str, token: str, ids_only: bool
    ) -> tuple[list[user_pb2.User], str]:
        """One ListUsers page (prefetched when it was asked for already), then the next one
        is asked for in the background. Only one page is ever held ahead: memory stays flat."""
        ahead, self._next = self._next, None
        wanted = (app_id, token, ids_only)
        if ahead is not None and ahead[0] == wanted:
            users, next_token = await ahead[1]
        else:
            if ahead is not None:
                ahead[1].cancel()
            users, next_token = await self._runtime.peers.list_users_page(
                app_id, token, PAGE_SIZE, ids_only=ids_only
            )
        if next_token:
            task = asyncio.create_task(
                self._runtime.peers.list_users_page(
                    app_id, next_token, PAGE_SIZE, ids_only=ids_only
                )
            )
            task.add_done_callback(_seen)
            self._next = ((app_id, next_token, ids_only), task)
        return users, next_token

    async def run(self, page_workers: int = PAGE_WORKERS) -> None:
        """Until cancelled: read pages of jobs, and enter pages (``page_workers`` at once)."""
        await asyncio.gather(
            self._loop(self.work_once, self._entered),
            *(self._loop(self.enter_page, self._stored) for _ in range(page_workers)),
        )

    async def _loop(self, step: Callable[[], Awaitable[bool]], wake: asyncio.Event) -> None:
        while True:
            wake.clear()  # before the step: what it misses sets the event again
            if not await step():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), _IDLE_SECONDS)

    async def enter_page(self) -> bool:
        """Enter one read page of an all-contacts audience; False when none is waiting."""
        now = self._ctx.clock()
        async with self._ctx.pool.acquire() as conn, conn.transaction():
            page = await conn.fetchrow(
                """
                SELECT p.app_id, p.journey_id, p.version, p.page_no, p.user_ids
                FROM audience_pages p
                JOIN journeys j ON j.app_id = p.app_id AND j.journey_id = p.journey_id
                -- A paused journey's pages wait for Resume (Stop deletes them).
                WHERE p.entered IS NULL AND j.state = 'active'
                ORDER BY p.page_no
                LIMIT 1
                FOR UPDATE OF p SKIP LOCKED
                """
            )
            if page is None:
                return False
            app_id, journey_id, version = page["app_id"], page["journey_id"], page["version"]
            # Holding a page Stop deletes: never wait for the journey's row (a Stop holding it
            # would wait for the page); the page is taken again after that change commits.
            states = await journey_states(conn, {(app_id, journey_id)}, skip_locked=True)
            if states[(app_id, journey_id)] == BUSY:
                return False
            outcomes = await enter(
                conn,
                app_id,
                journey_id,
                self._runtime.catalog.definition,
                [Candidate(u, f"activation:{version}") for u in page["user_ids"]],
                now,
                stepper=self._runtime.engine.step_entered,
            )
            # Only this page's row: page workers never wait for each other or the reader.
            await conn.execute(
                "UPDATE audience_pages SET entered = $5, user_ids = '{}'"
                " WHERE app_id = $1 AND journey_id = $2 AND version = $3 AND page_no = $4",
                app_id,
                journey_id,
                version,
                page["page_no"],
                outcomes.count(ENTERED),
            )
        self._entered.set()
        self._runtime.engine.nudge()
        return True

    async def work_once(self) -> bool:
        """One page of one job; False when there was nothing to do."""
        worked, entered = await self._job_page()
        if entered:
            self._runtime.engine.nudge()  # committed: customers of the page may be due now
        return worked

    async def _job_page(self) -> tuple[bool, bool]:
        """One page of one job: ``(whether there was work, whether customers entered)``."""
        now = self._ctx.clock()
        pool = self._ctx.pool
        catalog = self._runtime.catalog
        async with pool.acquire() as conn, conn.transaction():
            job = await conn.fetchrow(
                """
                SELECT app_id, journey_id, version, kind, segment_id, page_token, scanned,
                       entered, pages
                FROM audience_jobs j
                WHERE NOT done AND (retry_at IS NULL OR retry_at <= $1)
                  -- Read ahead of the page workers by a few pages at most.
                  AND (SELECT count(*) FROM audience_pages p
                       WHERE p.app_id = j.app_id AND p.journey_id = j.journey_id
                         AND p.version = j.version AND p.entered IS NULL) < $2
                ORDER BY retry_at NULLS FIRST
                LIMIT 1
                FOR UPDATE SKIP LOCKED
                """,
                now,
                PAGES_AHEAD,
            )
            if job is None:
                return False, False
            app_id, journey_id = job["app_id"], job["journey_id"]
            trigger = f"activation:{job['version']}"
            state = await conn.fetchval(
                "SELECT state FROM journeys WHERE app_id = $1 AND journey_id = $2",
                app_id,
                journey_id,
            )
            if state == "paused":
                await self._later(conn, job, now, "the journey is paused")
                return False, False
            if state != "active":
                await self._finish(conn, job, 0, 0, "")
                return True, False
            definition = await catalog.definition(app_id, journey_id, job["version"])
            opens = _entry_start(definition)
            if opens is not None and now < opens:
                # Entered now, the audience would only be refused (OUTSIDE_SCHEDULE).
                await self._wait_until(conn, job, opens)
                return False, False
            try:
                if job["kind"] == "segment":
                    scanned, entered, cursor = await self._segment_page(conn, job, trigger, now)
                    await self._finish(conn, job, scanned, entered, cursor, done=not cursor)
                    return True, entered > 0
                # All contacts need only who they are; birthdays need the birthdate and zone.
                ids_only = job["kind"] != "birthday"
                users, next_token = await self._page(app_id, job["page_token"], ids_only)
                zone = "" if ids_only else await self._runtime.peers.default_zone(app_id)
            except (PeerUnavailable, PeerRefused, _Busy) as exc:
                await self._later(conn, job, now, str(exc))
                return False, False
            if job["kind"] == "birthday":
                birthday = definition.entry.birthday
                timers = birthday_timers(
                    users, birthday.days_offset, _entry_time(birthday), now, zone
                )
                await upsert_birthday_timers(conn, app_id, journey_id, timers)
            elif users:
                # Entering is left to the page workers of every replica.
                await conn.execute(
                    """
                    INSERT INTO audience_pages (app_id, journey_id, version, page_no, user_ids)
                    VALUES ($1, $2, $3, $4, $5)
                    """,
                    app_id,
                    journey_id,
                    job["version"],
                    job["pages"],
                    [uuid.UUID(u.user_id) for u in users],
                )
            await self._finish(conn, job, len(users), 0, next_token, done=not next_token)
        self._stored.set()
        return True, False

    async def _segment_page(
        self, conn: Any, job: Any, trigger: str, now: datetime
    ) -> tuple[int, int, str]:
        """Enter the next :data:`PAGE_SIZE` members of the segment, after the job's cursor (the
        last user id entered), in the job's transaction; ``(scanned, entered, next cursor)``,
        the cursor empty once the members ran out."""
        app_id, journey_id = job["app_id"], job["journey_id"]
        members = [
            uuid.UUID(user_id)
            async for user_id in self._runtime.peers.segment_members(
                app_id, job["segment_id"], after_user_id=job["page_token"], limit=PAGE_SIZE
            )
        ]
        if not members:
            return 0, 0, ""
        # Holding the job row Stop updates: never wait for the journey's row (a Stop holding it
        # would wait for the job); the job is taken again after that change commits.
        states = await journey_states(conn, {(app_id, journey_id)}, skip_locked=True)
        if states[(app_id, journey_id)] == BUSY:
            raise _Busy("the journey is being changed")
        outcomes = await enter(
            conn,
            app_id,
            journey_id,
            self._runtime.catalog.definition,
            [Candidate(user_id, trigger) for user_id in members],
            now,
            stepper=self._runtime.engine.step_entered,
        )
        cursor = str(members[-1]) if len(members) == PAGE_SIZE else ""
        return len(members), outcomes.count(ENTERED), cursor

    async def _wait_until(self, conn: Any, job: Any, moment: datetime) -> None:
        await conn.execute(
            """
            UPDATE audience_jobs SET retry_at = $4, last_error = $5
            WHERE app_id = $1 AND journey_id = $2 AND version = $3
            """,
            job["app_id"],
            job["journey_id"],
            job["version"],
            moment,
            "waiting for the entry start time",
        )

    async def _later(self, conn: Any, job: Any, now: datetime, error: str) -> None:
        log.warning("audience of journey %s waits: %s", job["journey_id"], error)
        await conn.execute(
            """
            UPDATE audience_jobs SET retry_at = $4, last_error = $5
            WHERE app_id = $1 AND journey_id = $2 AND version = $3
            """,
            job["app_id"],
            job["journey_id"],
            job["version"],
            now + RETRY_AFTER,
            error[:500],
        )

    async def _finish(
        self,
        conn: Any,
        job: Any,
        scanned: int,
        entered: int,
        next_token: str,
        *,
        done: bool = True,
    ) -> None:
        await conn.execute(
            """
            UPDATE audience_jobs SET page_token = $4, scanned = scanned + $5,
                                     entered = entered + $6, done = $7, retry_at = NULL,
                                     last_error = '', pages = pages + 1
            WHERE app_id = $1 AND journey_id = $2 AND version = $3
            """,
            job["app_id"],
            job["journey_id"],
            job["version"],
            next_token,
            scanned,
            entered,
            done,
        )


def _entry_start(definition: Any) -> datetime | None:
    """The definition's ``entry_start_time``, or None when it has none."""
    if not definition.HasField("entry_start_time"):
        return None
    return definition.entry_start_time.ToDatetime(tzinfo=UTC)  # type: ignore[no-any-return]


def _seen(task: asyncio.Task[Any]) -> None:
    # A prefetch nobody awaits (the job moved on, or failed): its error is not news.
    if not task.cancelled():
        task.exception()


async def run_audience_loader(runtime: JourneyRuntime, ctx: ServiceContext) -> None:
    """Background task: work through audience jobs until cancelled."""
    runtime.ready()
    await AudienceLoader(runtime, ctx).run()
