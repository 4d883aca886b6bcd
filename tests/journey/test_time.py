"""Day-long delays and birthdays with the simulated clock (``TIDINGS_CLOCK_OFFSET_SECONDS``).

Each test runs its own journey process on its own database, then kills it (SIGKILL) and starts
it again with the clock moved forward: timers are rows, so they survive and fire then.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc.aio
from google.type import date_pb2, timeofday_pb2
from tidings.identity.v1 import user_ref_pb2
from tidings.journey.v1 import journey_pb2 as jpb
from tidings.journey.v1 import journey_service_pb2 as pb

from tests.conftest import temporary_database
from tests.e2e.processes import ServiceProcess
from tests.identity.conftest import TestApp
from tests.journey.support import (
    SendFeed,
    create_active,
    definition,
    delay,
    exit_node,
    journey_process,
    journey_stub,
    send,
)
from tests.journey.test_send_flow import make_users

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
