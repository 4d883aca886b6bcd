"""CSV uploads of customers, tenant isolation, statistics over time ranges, the SSRF guard."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from tidings.identity.v1 import identity_service_pb2 as ipb
from tidings.identity.v1 import user_pb2
from tidings.journey.v1 import journey_pb2 as jpb
from tidings.journey.v1 import journey_service_pb2 as pb

from services.journey.webhooks import (
    WebhookCall,
    WebhookRefused,
    call_webhook,
    check_literal_url,
)
from services.runtime.http_client import HttpClient
from tests.identity.conftest import TestApp
from tests.identity.support import ext, failure, new_id
from tests.journey.support import (
    SendFeed,
    create_active,
    definition,
    exit_node,
    node,
    seconds,
    send,
)
from tests.journey.test_lifecycle import add
from tests.journey.test_send_flow import make_users
from tests.polling import eventually


async def _upload(
    journeys: Any, app: TestApp, journey_id: str, csv: bytes, request_id: str, id_kind: str = ""
) -> pb.UploadCustomersResponse:
    async def messages() -> AsyncIterator[pb.UploadCustomersRequest]:
        yield pb.UploadCustomersRequest(
            options=pb.UploadCustomersOptions(
                journey_id=journey_id, request_id=request_id, id_kind=id_kind
            )
        )
        # Split anywhere, even inside a line or a UTF-8 character.
        for start in range(0, len(csv), 7):
            yield pb.UploadCustomersRequest(chunk=csv[start : start + 7])

    response: pb.UploadCustomersResponse = await journeys.UploadCustomers(
        messages(), metadata=app.server
    )
    return response


async def test_a_csv_upload_enters_known_customers_once(
    journeys: Any, users: Any, app: TestApp, feed: SendFeed
) -> None:
    known = [new_id("crm") for _ in range(3)]
    await users.BatchUpsertUsers(
        ipb.BatchUpsertUsersRequest(
            requests=[
                ipb.UpsertUserRequest(ref=ext(e), user=user_pb2.User(first_name="Zoë"))
                for e in known
            ]
        ),
        metadata=app.server,
    )
    journey = await create_active(
        journeys, app.server, definition(send("hi", next="end"), exit_node())
    )
    csv = (
        "\ufeffname,customerId\r\n"
        f"Zoë,{known[0]}\r\n"
        f"Ana,{known[1]}\r\n"
        ",\r\n"
        f"Bob,{new_id('nobody')}\r\n"
        f"Zoë again,{known[0]}\r\n"
        f"Cy,{known[2]}"
    ).encode()
    result = await _upload(journeys, app, journey.journey_id, csv, "file-1")
    assert (result.rows, result.entered, result.rejected) == (6, 3, 3)
    assert [(r.line, r.reason) for r in result.rejections] == [
        (4, "INVALID_ID"),
        (5, "USER_NOT_FOUND"),
        (6, "ALREADY_INSIDE"),
    ]
    await feed.wait_for(3, journey.journey_id)
    again = await _upload(journeys, app, journey.journey_id, csv, "file-1")
    assert again.entered == 0
    await feed.settle(1)
    assert len(feed.of(journey.journey_id)) == 3
    bad = await failure(_upload(journeys, app, journey.journey_id, b"id,name\n1,2\n", "file-2"))
    assert (bad.code, bad.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "ID_COLUMN_MISSING")
    assert bad.fields == ["options.id_column"]
    kind = await failure(_upload(journeys, app, journey.journey_id, csv, "file-3", id_kind="email"))
    assert (kind.code, kind.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["options.id_kind"])


async def test_an_upload_cut_off_mid_line_never_enters_the_line_cut_short(
    journeys: Any, users: Any, app: TestApp
) -> None:
    # The file's last line names "<cut>7"; the upload breaks off after "<cut>", which names
    # another customer. grpc.aio ends the request stream when the client goes away just as when
    # it finished sending: that partial line must not be taken for a whole one.
    cut = new_id("cut")
    await users.BatchUpsertUsers(
        ipb.BatchUpsertUsersRequest(
            requests=[ipb.UpsertUserRequest(ref=ext(e)) for e in (cut, f"{cut}7")]
        ),
        metadata=app.server,
    )
    first = [new_id("row") for _ in range(1000)]  # one whole batch: entered before the cut
    await users.BatchUpsertUsers(
        ipb.BatchUpsertUsersRequest(requests=[ipb.UpsertUserRequest(ref=ext(e)) for e in first]),
        metadata=app.server,
    )
    journey = await create_active(
        journeys, app.server, definition(send("hi", next="end"), exit_node())
    )
    whole = "customerId\n" + "".join(f"{e}\n" for e in first) + f"{cut}7\n"
    options = pb.UploadCustomersOptions(journey_id=journey.journey_id, request_id="cut-file")
    never = asyncio.Event()

    async def cut_off() -> AsyncIterator[pb.UploadCustomersRequest]:
        yield pb.UploadCustomersRequest(options=options)
        yield pb.UploadCustomersRequest(chunk=whole[: whole.rindex("7")].encode())
        await never.wait()

    def state(external_id: str) -> Any:
        request = pb.GetCustomerStateRequest(
            journey_id=journey.journey_id, customer=ext(external_id)
        )
        return journeys.GetCustomerState(request, metadata=app.server)

    async def entered(external_id: str) -> bool:
        try:
            await state(external_id)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return False
        return True

    call = journeys.UploadCustomers(cut_off(), metadata=app.server)
    # The first 1,000 rows are in: the server has read the chunk, "<cut>" included.
    await eventually(lambda: entered(first[-1]), within=30, what="the first batch entered")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    again = await _upload(journeys, app, journey.journey_id, whole.encode(), "cut-file")
    assert (again.rows, again.entered, again.rejected) == (1001, 1, 1000)
    assert await entered(f"{cut}7")
    assert not await entered(cut)


async def test_concurrent_entries_under_a_concurrency_limit_neither_deadlock_nor_overfill(
    journeys: Any, users: Any, app: TestApp
) -> None:
    limit = 4
    people = await make_users(users, app, 24)
    journey = await create_active(
        journeys,
        app.server,
        definition(
            node("hold", delay=jpb.DelayNode(duration=seconds(3600)), next={"next": "end"}),
            exit_node(),
            max_concurrent_customers=limit,
        ),
    )
    jid = journey.journey_id
    # Twelve calls at once, two customers each: every entry waits for the count of the others.
    answers = await asyncio.gather(
        *(add(journeys, app, jid, people[i : i + 2]) for i in range(0, len(people), 2)),
        return_exceptions=True,
    )
    errors = [a for a in answers if isinstance(a, BaseException)]
    assert errors == []  # no ABORTED (deadlock) nor any other failure
    results = [r for a in answers if not isinstance(a, BaseException) for r in a.results]
    assert sum(r.entered for r in results) == limit
    refused = {r.error.code for r in results if not r.entered}
    assert refused == {grpc.StatusCode.FAILED_PRECONDITION.value[0]}  # the limit
    inside = await journeys.ListCustomerStates(
        pb.ListCustomerStatesRequest(journey_id=jid, page_size=100), metadata=app.server
    )
    assert len(inside.states) == limit


async def test_another_apps_journey_is_not_found(
    journeys: Any, app: TestApp, other_app: TestApp
) -> None:
    journey = await create_active(
        journeys, app.server, definition(send("hi", next="end"), exit_node())
    )
    for call in (
        journeys.GetJourney(
            pb.GetJourneyRequest(journey_id=journey.journey_id), metadata=other_app.server
        ),
        journeys.StopJourney(
            pb.StopJourneyRequest(journey_id=journey.journey_id), metadata=other_app.server
        ),
        journeys.GetJourneyStats(
            pb.GetJourneyStatsRequest(journey_id=journey.journey_id), metadata=other_app.server
        ),
    ):
        assert (await failure(call)).code == grpc.StatusCode.NOT_FOUND


async def test_statistics_count_only_the_time_range(
    journeys: Any, users: Any, app: TestApp, feed: SendFeed
) -> None:
    from tests.journey.test_lifecycle import add
    from tests.journey.test_send_flow import make_users

    people = await make_users(users, app, 2)
    journey = await create_active(
        journeys, app.server, definition(send("hi", next="end"), exit_node())
    )
    await add(journeys, app, journey.journey_id, people)
    await feed.wait_for(2, journey.journey_id)

    def stamp(moment: datetime) -> Timestamp:
        t = Timestamp()
        t.FromDatetime(moment)
        return t

    now = datetime.now(UTC)
    before = await journeys.GetJourneyStats(
        pb.GetJourneyStatsRequest(
            journey_id=journey.journey_id, end_time=stamp(now - timedelta(hours=1))
        ),
        metadata=app.server,
    )
    assert before.entered == 0
    assert all(n.entered == 0 for n in before.nodes)
    around = await journeys.GetJourneyStats(
        pb.GetJourneyStatsRequest(
            journey_id=journey.journey_id,
            start_time=stamp(now - timedelta(hours=1)),
            end_time=stamp(now + timedelta(hours=1)),
        ),
        metadata=app.server,
    )
    assert around.entered == 2
    assert {n.node_id: n.sent for n in around.nodes}["hi"] == 2
    backwards = await failure(
        journeys.GetJourneyStats(
            pb.GetJourneyStatsRequest(
                journey_id=journey.journey_id, start_time=stamp(now), end_time=stamp(now)
            ),
            metadata=app.server,
        )
    )
    assert backwards.fields == ["end_time"]


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:8080/x",
        "http://127.0.0.1/x",
        "http://[::1]/x",
        "http://[::ffff:10.0.0.1]/x",
        "http://169.254.169.254/latest/meta-data",
        "ftp://example.com/x",
        "http://user:pw@example.com/x",
    ],
)
async def test_the_ssrf_guard_refuses_local_and_private_targets(url: str) -> None:
    with pytest.raises(WebhookRefused):
        check_literal_url(url, allow_private=False)
    client = HttpClient()
    result = await call_webhook(client, WebhookCall("POST", url, "{}"), allow_private=False)
    client.close()
    assert not result.success
    assert result.detail.startswith("refused")
