"""Time-relative segments as days pass: the identity process runs on a clock this module moves.

The process is the real service with one change, made by this module when it runs as the
process (``python -m tests.identity.test_segments_time_days``): its context's injectable clock is
the real one plus an offset read from a file the tests write. So "three days later" or "just
after midnight in Tokyo" is one write away, and the maintainer's scheduled re-check (every
second here) moves users in and out with the usual facts and history. The clock only moves
forward, so every test picks its moments after the current one and the tests run in any order.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2
from google.type import date_pb2
from tidings.events.v1.identity_change_pb2 import IdentityChange
from tidings.identity.v1 import apps_service_pb2_grpc, identity_service_pb2_grpc
from tidings.identity.v1 import segment_pb2 as sp

from services.identity.server import spec
from services.runtime.app import Clock, ServiceContext, main, utc_now
from tests.conftest import temporary_database
from tests.e2e.processes import PYTHON, ROOT, ServiceProcess, free_port, service_env
from tests.identity.conftest import TestApp, create_test_app
from tests.identity.import_support import DATE, attribute, csv_bytes, options, standard, upload
from tests.identity.support import ChangeFeed, ext
from tests.identity.test_segments_support import (
    Op,
    all_,
    attr,
    create_segment,
    event,
    member_external_ids,
    member_of,
    not_,
    stored_events,
    track,
    ts,
    upsert,
)

ENTERED = IdentityChange.KIND_SEGMENT_ENTERED
EXITED = IdentityChange.KIND_SEGMENT_EXITED

#: The variable naming the file that holds the process's clock offset, in seconds.
CLOCK_FILE_ENV = "SEGMENTS_TEST_CLOCK_FILE"
#: This module, run as the identity process.
LAUNCHER = "tests.identity.test_segments_time_days"

NEW_YORK = ZoneInfo("America/New_York")  # west of UTC (-5 / -4)
TOKYO = ZoneInfo("Asia/Tokyo")  # east of UTC (+9)
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)


# -- the process and its clock ---------------------------------------------------------------------


def _offset_clock(path: Path) -> Clock:
    """The real clock plus the offset last written to ``path`` (replaced whole, never torn)."""

    def now() -> datetime:
        return utc_now() + timedelta(seconds=float(path.read_text()))

    return now


def _serve_on_the_test_clock() -> None:
    """Run the identity service with its context's clock on the offset file."""
    service = spec()
    register = service.register
    clock = _offset_clock(Path(os.environ[CLOCK_FILE_ENV]))

    def register_on_clock(server: grpc.aio.Server, ctx: ServiceContext) -> Sequence[str]:
        ctx.clock = clock  # before any servicer or background task reads it
        return register(server, ctx)

    service.register = register_on_clock
    main(service)


class ServiceClock:
    """The identity process's clock as the tests see and move it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = timedelta(0)
        self._write()

    def now(self) -> datetime:
        return datetime.now(UTC) + self._offset

    def move_to(self, moment: datetime) -> datetime:
        """Make ``moment`` the process's present (it goes on ticking from there)."""
        assert moment > self.now(), "the clock only moves forward"
        self._offset = moment - datetime.now(UTC)
        self._write()
        return moment

    def _write(self) -> None:
        draft = self.path.with_suffix(".draft")
        draft.write_text(str(self._offset.total_seconds()))
        os.replace(draft, self.path)  # atomic: the process never reads half a number


class Service:
    """The process's stubs and clock."""

    def __init__(self, channel: grpc.aio.Channel, clock: ServiceClock) -> None:
        self.identity: Any = identity_service_pb2_grpc.IdentityServiceStub(channel)
        self.apps: Any = apps_service_pb2_grpc.AppsServiceStub(channel)
        self.clock = clock


async def _start(dsn: str, directory: Path, clock: ServiceClock) -> ServiceProcess:
    grpc_port, metrics_port = free_port(), free_port()
    log_path = directory / "identity.log"
    env = service_env(
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        database_url=dsn,
        extra={"TIDINGS_SEGMENT_REFRESH_SECONDS": "1", CLOCK_FILE_ENV: str(clock.path)},
    )
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            str(PYTHON),
            "-m",
            LAUNCHER,
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
        )
    return ServiceProcess("identity", process, grpc_port, metrics_port, log_path)


@pytest.fixture(scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Service]:
    directory = tmp_path_factory.mktemp("identity-segment-days")
    clock = ServiceClock(directory / "clock-offset")
    async with temporary_database() as dsn:
        process = await _start(dsn, directory, clock)
        try:
            await process.wait_serving()
            async with grpc.aio.insecure_channel(process.grpc_target) as channel:
                yield Service(channel, clock)
        finally:
            await process.kill()


@pytest.fixture
async def own_app(service: Service) -> TestApp:
    return await create_test_app(service.apps)


# -- facts, members, history ---------------------------------------------------------------------

#: Each user's facts about one segment in order: "+" entered, "-" exited ("+-+": in, out, in).
Facts = dict[str, str]


def facts_of(feed: ChangeFeed, segment_id: str) -> Facts:
    found: Facts = {}
    for change in feed.changes:
        if change.segment_id == segment_id and change.kind in (ENTERED, EXITED):
            sign = "+" if change.kind == ENTERED else "-"
            found[change.external_id] = found.get(change.external_id, "") + sign
    return found


async def new_segment(service: Service, app: TestApp, condition: sp.Condition) -> str:
    """A new segment's id."""
    return str((await create_segment(service.identity, app, condition)).segment_id)


async def reach(
    service: Service,
    app: TestApp,
    feed: ChangeFeed,
    expected: Mapping[str, Facts],
    within: float = 30.0,
) -> None:
    """Wait until the facts about each segment (by id) are exactly ``expected``, then check
    its members are the users whose last fact is an entry (facts and members commit
    together)."""

    def seen() -> dict[str, Facts]:
        return {segment_id: facts_of(feed, segment_id) for segment_id in expected}

    try:
        await feed.until(lambda _: seen() == expected, within=within)
    except TimeoutError:
        raise AssertionError(f"facts never became {expected}; seen {seen()}") from None
    for segment_id, want in expected.items():
        members = {user for user, signs in want.items() if signs.endswith("+")}
        found = await member_external_ids(service.identity, app, segment_id)
        assert found == members, segment_id


Period = tuple[datetime, datetime | None]


async def periods(service: Service, app: TestApp, segment_id: str, user: str) -> list[Period]:
    """The user's periods of membership (GetSegmentMembership)."""
    response = await service.identity.GetSegmentMembership(
        sp.GetSegmentMembershipRequest(segment_id=segment_id, user=ext(user)),
        metadata=app.server,
    )
    return [
        (
            p.enter_time.ToDatetime(tzinfo=UTC),
            p.exit_time.ToDatetime(tzinfo=UTC) if p.HasField("exit_time") else None,
        )
        for p in response.history
    ]


async def member_at(
    service: Service, app: TestApp, segment_id: str, user: str, moment: datetime
) -> bool:
    response = await service.identity.GetSegmentMembership(
        sp.GetSegmentMembershipRequest(
            segment_id=segment_id, user=ext(user), at_time=ts(moment.astimezone(UTC))
        ),
        metadata=app.server,
    )
    return bool(response.member_at_time)


def between(moment: datetime | None, start: datetime, end: datetime) -> bool:
    """Whether a recorded time lies in ``[start, end)`` (the moves around the change)."""
    return moment is not None and start <= moment < end


def local_midnight(day: date, zone: ZoneInfo) -> datetime:
    """When ``day`` begins in ``zone``, in UTC."""
    return datetime.combine(day, time(0), zone).astimezone(UTC)


def days_ahead(now: datetime, days: int) -> date:
    """A date ``days`` or more after ``now`` (UTC) that is not 29 February (a 1990 birthdate
    cannot be), so every test's calendar works in any year."""
    day = (now + days * DAY).date()
    while (day.month, day.day) == (2, 29):
        day += DAY
    return day


def duration(span: timedelta) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromTimedelta(span)
    return message


# -- attribute conditions relative to today -------------------------------------------------------


async def test_within_last_and_next_days_follow_the_clock(
    service: Service, own_app: TestApp
) -> None:
    stub, clock = service.identity, service.clock
    t0 = clock.now()
    # a: ordered yesterday, renews in 5 days. b: an order dated 2 days ahead (not yet "in the
    # last days": it has not happened), renews tomorrow.
    await upsert(stub, own_app, "a", {"last_order": t0 - DAY, "renewal": t0 + 5 * DAY})
    await upsert(stub, own_app, "b", {"last_order": t0 + 2 * DAY, "renewal": t0 + DAY})
    async with ChangeFeed(own_app.app_id) as feed:
        ordered = await new_segment(
            service, own_app, attr("attributes.last_order", Op.OPERATOR_WITHIN_LAST_DAYS, days=7)
        )
        renewing = await new_segment(
            service, own_app, attr("attributes.renewal", Op.OPERATOR_WITHIN_NEXT_DAYS, days=3)
        )
        new = await new_segment(
            service, own_app, attr("create_time", Op.OPERATOR_WITHIN_LAST_DAYS, days=3)
        )
        created = clock.now()
        await reach(
            service,
            own_app,
            feed,
            {ordered: {"a": "+"}, renewing: {"b": "+"}, new: {"a": "+", "b": "+"}},
        )
        # b's order date arrives; a's renewal comes within 3 days; b's renewal passes.
        m1 = clock.move_to(t0 + 2 * DAY + HOUR)
        await reach(
            service,
            own_app,
            feed,
            {
                ordered: {"a": "+", "b": "+"},
                renewing: {"a": "+", "b": "+-"},
                new: {"a": "+", "b": "+"},
            },
        )
        # a's order is over 7 days old, a's renewal passed, both signed up over 3 days ago.
        m2 = clock.move_to(t0 + 6 * DAY + HOUR)
        await reach(
            service,
            own_app,
            feed,
            {
                ordered: {"a": "+-", "b": "+"},
                renewing: {"a": "+-", "b": "+-"},
                new: {"a": "+-", "b": "+-"},
            },
        )
        m3 = clock.move_to(t0 + 9 * DAY + HOUR)
        await reach(
            service,
            own_app,
            feed,
            {
                ordered: {"a": "+-", "b": "+-"},
                renewing: {"a": "+-", "b": "+-"},
                new: {"a": "+-", "b": "+-"},
            },
        )
    [(enter, exit_)] = await periods(service, own_app, ordered, "a")
    assert enter <= created
    assert between(exit_, m2, m3)
    [(enter, exit_)] = await periods(service, own_app, ordered, "b")
    assert between(enter, m1, m2)
    assert between(exit_, m3, clock.now() + MINUTE)
    [(enter, exit_)] = await periods(service, own_app, renewing, "a")
    assert between(enter, m1, m2)
    assert between(exit_, m2, m3)
    assert await member_at(service, own_app, renewing, "b", t0 + HOUR)
    assert not await member_at(service, own_app, renewing, "b", m1 + HOUR)
    assert await member_at(service, own_app, ordered, "a", m1 + HOUR)
    assert not await member_at(service, own_app, ordered, "a", m3)


# -- events: the last / first time within days, and "did not ... in" -----------------------------


async def test_event_times_follow_the_clock(service: Service, own_app: TestApp) -> None:
    stub, clock = service.identity, service.clock
    t0 = clock.now()
    await track(stub, own_app, "c", "login")  # now, on the process's clock
    await track(stub, own_app, "d", "login", at=t0 - 3 * DAY)
    await stored_events(stub, own_app, {"c": 1, "d": 1})
    two_days = sp.EventCondition.Occurrence(operator=Op.OPERATOR_WITHIN_LAST_DAYS, days=2)
    week = sp.EventCondition.Occurrence(operator=Op.OPERATOR_WITHIN_LAST_DAYS, days=7)
    window = timedelta(days=2)
    async with ChangeFeed(own_app.app_id) as feed:
        active = await new_segment(service, own_app, event("login", last_time=two_days))
        newcomers = await new_segment(service, own_app, event("login", first_time=week))
        lapsed = await new_segment(
            service,
            own_app,
            event(
                "login",
                count=0,
                count_operator=sp.COUNT_OPERATOR_AT_MOST,
                within_last=duration(window),
            ),
        )
        await reach(
            service,
            own_app,
            feed,
            {active: {"c": "+"}, newcomers: {"c": "+", "d": "+"}, lapsed: {"d": "+"}},
        )
        # Two days without a login: c leaves "active" and enters "lapsed" by time alone.
        m1 = clock.move_to(t0 + 2 * DAY + HOUR)
        await reach(
            service,
            own_app,
            feed,
            {
                active: {"c": "+-"},
                newcomers: {"c": "+", "d": "+"},
                lapsed: {"c": "+", "d": "+"},
            },
        )
        m2 = clock.move_to(t0 + 5 * DAY)  # d's first login is over 7 days old
        await reach(
            service,
            own_app,
            feed,
            {
                active: {"c": "+-"},
                newcomers: {"c": "+", "d": "+-"},
                lapsed: {"c": "+", "d": "+"},
            },
        )
    [(enter, exit_)] = await periods(service, own_app, active, "c")
    assert enter < m1
    assert between(exit_, m1, m2)
    [(enter, exit_)] = await periods(service, own_app, lapsed, "c")
    assert between(enter, m1, m2)
    assert exit_ is None
    assert not await member_at(service, own_app, lapsed, "c", t0 + DAY)
    assert await member_at(service, own_app, lapsed, "c", m1 + HOUR)


# -- birthdays and anniversaries at each user's local midnight ----------------------------------


async def test_birthdays_and_anniversaries_turn_at_local_midnight(
    service: Service, own_app: TestApp
) -> None:
    stub, clock = service.identity, service.clock
    day = days_ahead(clock.now(), 5)
    # Birthdays and anniversaries on `day`, each in the user's own zone. The anniversaries are
    # at times whose UTC date is another day: only the local date counts.
    await upsert(
        stub,
        own_app,
        "tokyo",
        {"joined_at": datetime(2020, day.month, day.day, 0, 30, tzinfo=TOKYO).astimezone(UTC)},
        timezone="Asia/Tokyo",
        birthdate=date_pb2.Date(year=1990, month=day.month, day=day.day),
    )
    await upsert(
        stub,
        own_app,
        "ny",
        {"joined_at": datetime(2020, day.month, day.day, 23, 30, tzinfo=NEW_YORK).astimezone(UTC)},
        timezone="America/New_York",
        birthdate=date_pb2.Date(year=0, month=day.month, day=day.day),  # year unknown
    )
    async with ChangeFeed(own_app.app_id) as feed:
        today = await new_segment(
            service, own_app, attr("birthdate", Op.OPERATOR_ANNIVERSARY_IN_DAYS, days=0)
        )
        soon = await new_segment(
            service, own_app, attr("birthdate", Op.OPERATOR_ANNIVERSARY_IN_DAYS, days=2)
        )
        joined = await new_segment(
            service, own_app, attr("attributes.joined_at", Op.OPERATOR_ANNIVERSARY_IN_DAYS, days=0)
        )
        # Each move is a minute past midnight somewhere: Tokyo's day begins first.
        steps: list[tuple[date, ZoneInfo, dict[str, Facts]]] = [
            (day - 2 * DAY, TOKYO, {soon: {"tokyo": "+"}}),
            (day - 2 * DAY, NEW_YORK, {soon: {"tokyo": "+", "ny": "+"}}),
            (day - DAY, TOKYO, {soon: {"tokyo": "+-", "ny": "+"}}),
            (day - DAY, NEW_YORK, {soon: {"tokyo": "+-", "ny": "+-"}}),
            (day, TOKYO, {today: {"tokyo": "+"}, joined: {"tokyo": "+"}}),
            (day, NEW_YORK, {today: {"tokyo": "+", "ny": "+"}, joined: {"tokyo": "+", "ny": "+"}}),
            (
                day + DAY,
                TOKYO,
                {today: {"tokyo": "+-", "ny": "+"}, joined: {"tokyo": "+-", "ny": "+"}},
            ),
            (
                day + DAY,
                NEW_YORK,
                {today: {"tokyo": "+-", "ny": "+-"}, joined: {"tokyo": "+-", "ny": "+-"}},
            ),
        ]
        moves: list[datetime] = []
        expected: dict[str, Facts] = {today: {}, soon: {}, joined: {}}
        await reach(service, own_app, feed, expected)
        for local_day, zone, changed in steps:
            moves.append(clock.move_to(local_midnight(local_day, zone) + MINUTE))
            expected.update(changed)
            await reach(service, own_app, feed, expected)
    moves.append(clock.now() + MINUTE)
    # The periods lie between the moves that opened and closed them.
    for segment, first in ((soon, 0), (today, 4), (joined, 4)):
        for user, offset in (("tokyo", 0), ("ny", 1)):
            [(enter, exit_)] = await periods(service, own_app, segment, user)
            start = first + offset
            assert between(enter, moves[start], moves[start + 1]), (segment, user)
            assert between(exit_, moves[start + 2], moves[start + 3]), (segment, user)
    # Noon of the day in New York is already the next day in Tokyo.
    ny_noon = datetime.combine(day, time(12), NEW_YORK)
    tokyo_noon = datetime.combine(day, time(12), TOKYO)
    assert await member_at(service, own_app, today, "ny", ny_noon)
    assert not await member_at(service, own_app, today, "tokyo", ny_noon)
    assert await member_at(service, own_app, today, "tokyo", tokyo_noon)
    assert not await member_at(service, own_app, today, "ny", tokyo_noon)


async def test_an_imported_date_has_its_anniversary_on_the_local_day(
    service: Service, own_app: TestApp
) -> None:
    stub, clock = service.identity, service.clock
    day = days_ahead(clock.now(), 5)
    rows = [
        ["id", "timezone", "joined"],
        ["ny", "America/New_York", f"2020-{day:%m-%d}"],
        ["utc", "UTC", f"2020-{day:%m-%d}"],
    ]
    opts = options(standard("timezone"), attribute("joined", DATE))
    job = await upload(stub, own_app, opts, csv_bytes(rows))
    assert job.created == 2, job
    async with ChangeFeed(own_app.app_id) as feed:
        joined = await new_segment(
            service, own_app, attr("attributes.joined", Op.OPERATOR_ANNIVERSARY_IN_DAYS, days=0)
        )
        await reach(service, own_app, feed, {joined: {}})
        # The day begins in UTC while it is still the evening before in New York: the date
        # is the same calendar day everywhere, so only the UTC user's anniversary has come.
        clock.move_to(local_midnight(day, ZoneInfo("UTC")) + MINUTE)
        await reach(service, own_app, feed, {joined: {"utc": "+"}}, within=10)
        start = clock.move_to(local_midnight(day, NEW_YORK) + MINUTE)
        await reach(service, own_app, feed, {joined: {"utc": "+", "ny": "+"}}, within=10)
    [(enter, _)] = await periods(service, own_app, joined, "ny")
    assert enter >= start


# -- a segment built on a time-relative one -------------------------------------------------------


async def test_member_of_follows_a_segment_that_time_moves(
    service: Service, own_app: TestApp
) -> None:
    stub, clock = service.identity, service.clock
    t0 = clock.now()
    await upsert(stub, own_app, "a", {"plan": "gold", "last_order": t0 + DAY})
    await upsert(stub, own_app, "b", {"plan": "silver", "last_order": t0 + DAY})
    gold = attr("attributes.plan", Op.OPERATOR_EQUALS, "gold")
    async with ChangeFeed(own_app.app_id) as feed:
        recent = await new_segment(
            service, own_app, attr("attributes.last_order", Op.OPERATOR_WITHIN_LAST_DAYS, days=3)
        )
        # Neither refers to time itself: they follow `recent` when time moves it.
        gold_recent = await new_segment(service, own_app, all_(member_of(recent), gold))
        gold_lapsed = await new_segment(service, own_app, all_(gold, not_(member_of(recent))))
        chained = await new_segment(service, own_app, member_of(gold_recent))
        await reach(
            service,
            own_app,
            feed,
            {recent: {}, gold_recent: {}, gold_lapsed: {"a": "+"}, chained: {}},
        )
        m1 = clock.move_to(t0 + DAY + HOUR)  # the orders' date arrives
        await reach(
            service,
            own_app,
            feed,
            {
                recent: {"a": "+", "b": "+"},
                gold_recent: {"a": "+"},
                gold_lapsed: {"a": "+-"},
                chained: {"a": "+"},
            },
        )
        m2 = clock.move_to(t0 + 4 * DAY + HOUR)  # and is over 3 days old
        await reach(
            service,
            own_app,
            feed,
            {
                recent: {"a": "+-", "b": "+-"},
                gold_recent: {"a": "+-"},
                gold_lapsed: {"a": "+-+"},
                chained: {"a": "+-"},
            },
        )
    for segment in (gold_recent, chained):
        [(enter, exit_)] = await periods(service, own_app, segment, "a")
        assert between(enter, m1, m2)
        assert between(exit_, m2, clock.now() + MINUTE)
    [(_, exit_), (enter, still)] = await periods(service, own_app, gold_lapsed, "a")
    assert between(exit_, m1, m2)
    assert between(enter, m2, clock.now() + MINUTE)
    assert still is None
    assert await member_at(service, own_app, gold_recent, "a", m1 + DAY)
    assert not await member_at(service, own_app, gold_lapsed, "a", m1 + DAY)


if __name__ == "__main__":
    _serve_on_the_test_clock()
