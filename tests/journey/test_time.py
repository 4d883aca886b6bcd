"""Time with the simulated clock (``TIDINGS_CLOCK_OFFSET_SECONDS``): day-long delays, birthdays,
the app's default zone, the entry schedule, cooldowns, and timers overdue at Resume.

Each test runs its own journey process on its own database, then kills it (SIGKILL) and starts
it again with the clock moved forward: timers are rows, so they survive and fire then.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.type import date_pb2, timeofday_pb2
from tidings.identity.v1 import app_pb2, apps_service_pb2_grpc, user_ref_pb2
from tidings.journey.v1 import journey_pb2 as jpb
from tidings.journey.v1 import journey_service_pb2 as pb

from tests.conftest import temporary_database
from tests.e2e.processes import ServiceProcess
from tests.identity.conftest import TestApp, create_test_app
from tests.identity.support import item_failure
from tests.journey.support import (
    SendFeed,
    create_active,
    definition,
    delay,
    exit_node,
    journey_process,
    journey_stub,
    node,
    send,
)
from tests.journey.test_lifecycle import add, state
from tests.journey.test_send_flow import make_users
from tests.polling import eventually

DAY = 86_400


async def test_a_one_day_delay_fires_after_a_crash_and_a_day(
    identity_service: ServiceProcess, users: Any, app: TestApp, feed: SendFeed, tmp_path: Path
) -> None:
    (user_id,) = await make_users(users, app, 1)
    async with temporary_database() as dsn:
        async with journey_process(identity_service, dsn, tmp_path) as first:
            async with grpc.aio.insecure_channel(first.grpc_target) as channel:
                journeys = journey_stub(channel)
                journey = await create_active(
                    journeys,
                    app.server,
                    definition(
                        send("now", next="wait"),
                        delay("wait", DAY, next="tomorrow"),
                        send("tomorrow", next="end"),
                        exit_node("end"),
                    ),
                )
                await journeys.AddCustomers(
                    pb.AddCustomersRequest(
                        journey_id=journey.journey_id,
                        customers=[user_ref_pb2.UserRef(user_id=user_id)],
                    ),
                    metadata=app.server,
                )
                await feed.wait_for(1, journey.journey_id, "now")
            await first.kill()
        # A day and a minute later, in the engine's eyes.
        async with journey_process(
            identity_service, dsn, tmp_path, clock_offset_seconds=str(DAY + 60)
        ) as second:
            [later] = await feed.wait_for(1, journey.journey_id, "tomorrow")
            assert later.user_id == user_id
            await feed.settle(2)
            assert [r.journey_node_id for r in feed.of(journey.journey_id)] == ["now", "tomorrow"]
            del second


def _offset_to(moment: datetime) -> str:
    return str((moment - datetime.now(UTC)).total_seconds())


async def test_birthdays_enter_on_the_local_day_and_feb_29_on_feb_28(
    identity_service: ServiceProcess, users: Any, app: TestApp, feed: SendFeed, tmp_path: Path
) -> None:
    def born(year: int, month: int, day: int, zone: str) -> dict[str, Any]:
        return {"birthdate": date_pb2.Date(year=year, month=month, day=day), "timezone": zone}

    (leapling,) = await make_users(users, app, 1, **born(1992, 2, 29, "UTC"))
    (kiribati,) = await make_users(users, app, 1, **born(1990, 3, 1, "Pacific/Kiritimati"))
    (london,) = await make_users(users, app, 1, **born(1990, 3, 1, "Europe/London"))
    (nobody,) = await make_users(users, app, 1)
    birthday = jpb.Entry(birthday=jpb.Entry.Birthday(local_time=timeofday_pb2.TimeOfDay(hours=9)))
    d = definition(send("cake", next="end"), exit_node("end"), entry=birthday)
    # 2027 has no February 29. At 12:00 UTC on the 28th it is already 02:00 on March 1st in
    # Kiritimati (UTC+14), whose 09:00 is 19:00 UTC; in London March 1st is tomorrow.
    noon = datetime(2027, 2, 28, 12, 0, tzinfo=UTC)
    async with temporary_database() as dsn:
        async with journey_process(
            identity_service, dsn, tmp_path, clock_offset_seconds=_offset_to(noon)
        ) as first:
            async with grpc.aio.insecure_channel(first.grpc_target) as channel:
                journey = await create_active(journey_stub(channel), app.server, d)
            [cake] = await feed.wait_for(1, journey.journey_id)
            assert cake.user_id == leapling
            await feed.settle(2)
            assert len(feed.of(journey.journey_id)) == 1
            await first.kill()
        evening = datetime(2027, 2, 28, 20, 0, tzinfo=UTC)
        async with journey_process(
            identity_service, dsn, tmp_path, clock_offset_seconds=_offset_to(evening)
        ):
            await feed.wait_for(2, journey.journey_id)
            await feed.settle(2)
            assert [r.user_id for r in feed.of(journey.journey_id)] == [leapling, kiribati]
        next_morning = datetime(2027, 3, 1, 9, 30, tzinfo=UTC)
        async with journey_process(
            identity_service, dsn, tmp_path, clock_offset_seconds=_offset_to(next_morning)
        ):
            await feed.wait_for(3, journey.journey_id)
            await feed.settle(2)
            entered = [r.user_id for r in feed.of(journey.journey_id)]
            assert entered == [leapling, kiribati, london]
            assert nobody not in entered


T0 = datetime(2027, 3, 10, 12, 0, tzinfo=UTC)  # 04:00 in Los Angeles (PST, before DST)


async def test_a_customer_without_a_zone_has_the_apps_default_zone(
    identity_service: ServiceProcess,
    identity_channel_j: grpc.aio.Channel,
    users: Any,
    tmp_path: Path,
) -> None:
    settings = app_pb2.AppSettings(default_timezone="America/Los_Angeles")
    app = await create_test_app(apps_service_pb2_grpc.AppsServiceStub(identity_channel_j), settings)
    (user_id,) = await make_users(users, app, 1)  # no time zone of their own
    nine = jpb.DelayNode.UntilLocalTime(time=timeofday_pb2.TimeOfDay(hours=9))
    d = definition(
        node("wait", delay=jpb.DelayNode(until_local_time=nine), next={"next": "morning"}),
        send("morning", next="end"),
        exit_node("end"),
    )
    nine_in_la = datetime(2027, 3, 10, 17, 0, tzinfo=UTC)  # not 09:00 UTC tomorrow
    async with SendFeed(app.app_id) as feed, temporary_database() as dsn:
        async with journey_process(
            identity_service, dsn, tmp_path, clock_offset_seconds=_offset_to(T0)
        ) as first:
            async with grpc.aio.insecure_channel(first.grpc_target) as channel:
                journeys = journey_stub(channel)
                journey = await create_active(journeys, app.server, d)
                await add(journeys, app, journey.journey_id, [user_id])

                async def waiting() -> pb.CustomerState | None:
                    s = await state(journeys, app, journey.journey_id, user_id)
                    return s if s.status == pb.CustomerState.STATUS_WAITING else None

                waits = await eventually(waiting, what="the customer waiting")
                assert waits is not None
                assert waits.wake_time.ToDatetime(tzinfo=UTC) == nine_in_la
            await first.kill()
        async with journey_process(
            identity_service,
            dsn,
            tmp_path,
            clock_offset_seconds=_offset_to(nine_in_la + timedelta(minutes=1)),
        ):
            [morning] = await feed.wait_for(1, journey.journey_id, "morning")
            assert morning.user_id == user_id


async def test_an_audience_and_list_retries_wait_for_the_entry_start_time(
    identity_service: ServiceProcess, users: Any, app: TestApp, feed: SendFeed, tmp_path: Path
) -> None:
    everyone = await make_users(users, app, 3)
    opens = T0 + timedelta(hours=12)
    start = Timestamp(seconds=int(opens.timestamp()))
    audience = definition(
        send("hello", next="end"),
        exit_node("end"),
        entry=jpb.Entry(all_contacts=jpb.Entry.AllContacts()),
        entry_start_time=start,
    )
    listed = definition(send("listed", next="end"), exit_node("end"), entry_start_time=start)

    async def add_early(journeys: Any, journey_id: str) -> pb.AddCustomersResponse:
        response: pb.AddCustomersResponse = await journeys.AddCustomers(
            pb.AddCustomersRequest(
                journey_id=journey_id,
                customers=[user_ref_pb2.UserRef(user_id=everyone[0])],
                request_id="early",
            ),
            metadata=app.server,
        )
        return response

    async with temporary_database() as dsn:
        async with journey_process(
            identity_service, dsn, tmp_path, clock_offset_seconds=_offset_to(T0)
        ) as first:
            async with grpc.aio.insecure_channel(first.grpc_target) as channel:
                journeys = journey_stub(channel)
                all_contacts = await create_active(journeys, app.server, audience)
                customer_list = await create_active(journeys, app.server, listed)
                [early] = (await add_early(journeys, customer_list.journey_id)).results
                refused = item_failure(early.error)
                assert (refused.code, refused.reason) == (
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "OUTSIDE_SCHEDULE",
                )
                await feed.settle(2)
                assert feed.of(all_contacts.journey_id) == [], "nobody enters before"
                got = await journeys.GetJourney(
                    pb.GetJourneyRequest(journey_id=all_contacts.journey_id), metadata=app.server
                )
                assert (got.audience.scanned, got.audience.done) == (0, False)
            await first.kill()
        async with journey_process(
            identity_service,
            dsn,
            tmp_path,
            clock_offset_seconds=_offset_to(opens + timedelta(minutes=1)),
        ) as second:
            sends = await feed.wait_for(3, all_contacts.journey_id)
            assert sorted(s.user_id for s in sends) == sorted(everyone)
            async with grpc.aio.insecure_channel(second.grpc_target) as channel:
                # The same request, retried once the schedule is open, is not a duplicate.
                [retried] = (
                    await add_early(journey_stub(channel), customer_list.journey_id)
                ).results
                assert retried.entered
            await feed.settle(1)
            assert len(feed.of(all_contacts.journey_id)) == 3


async def test_a_cooldown_refuses_reentry_inside_it_and_accepts_it_after(
    identity_service: ServiceProcess, users: Any, app: TestApp, feed: SendFeed, tmp_path: Path
) -> None:
    (user_id,) = await make_users(users, app, 1)
    d = definition(
        send("hi", next="end"),
        exit_node("end"),
        reentry=jpb.ReentryPolicy(
            mode=jpb.ReentryPolicy.MODE_AFTER_COOLDOWN, cooldown=Duration(seconds=DAY)
        ),
    )
    async with temporary_database() as dsn:
        async with journey_process(
            identity_service, dsn, tmp_path, clock_offset_seconds=_offset_to(T0)
        ) as first:
            async with grpc.aio.insecure_channel(first.grpc_target) as channel:
                journeys = journey_stub(channel)
                journey = await create_active(journeys, app.server, d)
                jid = journey.journey_id
                [entered] = (await add(journeys, app, jid, [user_id])).results
                assert entered.entered
                await feed.wait_for(1, jid)

                async def exited() -> bool:
                    s = await state(journeys, app, jid, user_id)
                    return s.status == pb.CustomerState.STATUS_EXITED

                await eventually(exited, what="the customer out of the journey")
                [inside_cooldown] = (await add(journeys, app, jid, [user_id])).results
                refused = item_failure(inside_cooldown.error)
                assert refused.reason == "REENTRY_REFUSED"
            await first.kill()
        async with journey_process(
            identity_service,
            dsn,
            tmp_path,
            clock_offset_seconds=_offset_to(T0 + timedelta(seconds=DAY + 60)),
        ) as second:
            async with grpc.aio.insecure_channel(second.grpc_target) as channel:
                [after_cooldown] = (await add(journey_stub(channel), app, jid, [user_id])).results
                assert after_cooldown.entered
            await feed.wait_for(2, jid)
            assert [r.user_id for r in feed.of(jid)] == [user_id, user_id]


async def test_timers_that_came_due_while_paused_run_on_resume(
    identity_service: ServiceProcess, users: Any, app: TestApp, feed: SendFeed, tmp_path: Path
) -> None:
    (user_id,) = await make_users(users, app, 1)
    d = definition(delay("wait", 3600, next="later"), send("later", next="end"), exit_node("end"))
    async with temporary_database() as dsn:
        async with journey_process(
            identity_service, dsn, tmp_path, clock_offset_seconds=_offset_to(T0)
        ) as first:
            async with grpc.aio.insecure_channel(first.grpc_target) as channel:
                journeys = journey_stub(channel)
                journey = await create_active(journeys, app.server, d)
                jid = journey.journey_id
                await add(journeys, app, jid, [user_id])

                async def waiting() -> bool:
                    s = await state(journeys, app, jid, user_id)
                    return s.status == pb.CustomerState.STATUS_WAITING

                await eventually(waiting, what="the customer waiting")
                await journeys.PauseJourney(
                    pb.PauseJourneyRequest(journey_id=jid), metadata=app.server
                )
            await first.kill()
        # Two hours later the timer is an hour overdue, but the journey is paused.
        async with (
            journey_process(
                identity_service,
                dsn,
                tmp_path,
                clock_offset_seconds=_offset_to(T0 + timedelta(hours=2)),
            ) as second,
            grpc.aio.insecure_channel(second.grpc_target) as channel,
        ):
            journeys = journey_stub(channel)
            await feed.settle(2)
            assert feed.of(jid) == [], "nothing runs while paused"
            assert (await state(journeys, app, jid, user_id)).node_id == "wait"
            await journeys.ResumeJourney(
                pb.ResumeJourneyRequest(journey_id=jid), metadata=app.server
            )
            [later] = await feed.wait_for(1, jid, "later")
            assert later.user_id == user_id
