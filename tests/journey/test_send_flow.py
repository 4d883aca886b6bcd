"""Customers entered by list reach a send node: one send request each, through the outbox."""

from __future__ import annotations

from typing import Any

import grpc
from tidings.identity.v1 import identity_service_pb2 as ipb
from tidings.identity.v1 import user_pb2, user_ref_pb2
from tidings.journey.v1 import journey_service_pb2 as pb

from tests.identity.conftest import TestApp
from tests.identity.support import ext, item_failure, new_id
from tests.journey.support import (
    SendFeed,
    create_active,
    definition,
    error_domain,
    exit_node,
    send,
)
from tests.polling import eventually


async def make_users(users: Any, app: TestApp, count: int, **fields: Any) -> list[str]:
    """Create ``count`` users (in batches of 1,000); their user ids."""
    ids: list[str] = []
    for start in range(0, count, 1000):
        response = await users.BatchUpsertUsers(
            ipb.BatchUpsertUsersRequest(
                requests=[
                    ipb.UpsertUserRequest(
                        ref=ext(new_id()), user=user_pb2.User(first_name="Ana", **fields)
                    )
                    for _ in range(min(1000, count - start))
                ]
            ),
            metadata=app.server,
        )
        ids.extend(r.user.user_id for r in response.results)
    return ids


async def test_listed_customers_get_one_send_each(
    journeys: Any, users: Any, app: TestApp, feed: SendFeed
) -> None:
    user_ids = await make_users(users, app, 3)
    journey = await create_active(
        journeys, app.server, definition(send("push", next="end"), exit_node("end"))
    )
    refs = [user_ref_pb2.UserRef(user_id=u) for u in user_ids]
    added = await journeys.AddCustomers(
        pb.AddCustomersRequest(journey_id=journey.journey_id, customers=refs, request_id="r1"),
        metadata=app.server,
    )
    assert [r.entered for r in added.results] == [True, True, True]

    sends = await feed.wait_for(3, journey.journey_id)
    assert sorted(s.user_id for s in sends) == sorted(user_ids)
    assert {s.template_id for s in sends} == {"tpl-1"}
    assert all(list(s.channels) == ["ios_push"] for s in sends)
    assert len({s.idempotency_key for s in sends}) == 3
    assert all(s.idempotency_key.startswith(f"{journey.journey_id}/") for s in sends)

    # The same request again enters nobody (its trigger id was seen).
    again = await journeys.AddCustomers(
        pb.AddCustomersRequest(journey_id=journey.journey_id, customers=refs, request_id="r1"),
        metadata=app.server,
    )
    assert [r.entered for r in again.results] == [False] * 3
    assert {r.error.code for r in again.results} == {grpc.StatusCode.ALREADY_EXISTS.value[0]}
    assert {item_failure(r.error).reason for r in again.results} == {"DUPLICATE_TRIGGER"}
    assert {error_domain(r.error) for r in again.results} == {"journey"}

    async def exited() -> bool:
        stats = await journeys.GetJourneyStats(
            pb.GetJourneyStatsRequest(journey_id=journey.journey_id), metadata=app.server
        )
        nodes = {n.node_id: n for n in stats.nodes}
        return bool(stats.entered == 3) and nodes["end"].exited == 3 and stats.active == 0

    await eventually(exited, what="all customers through the journey")
    await feed.settle()
    assert len(feed.of(journey.journey_id)) == 3
