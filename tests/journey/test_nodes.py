"""Node kinds through the running engine: branch, split, update profile, webhook, date delays,
plus re-entry and concurrency rules and the customer-state API."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import grpc.aio
from google.protobuf.timestamp_pb2 import Timestamp
from tidings.identity.v1 import (
    app_pb2,
    apps_service_pb2_grpc,
    customer_field_pb2,
    segment_pb2,
    user_pb2,
    user_ref_pb2,
)
from tidings.identity.v1 import identity_service_pb2 as ipb
from tidings.journey.v1 import journey_pb2 as jpb
from tidings.journey.v1 import journey_service_pb2 as pb

from tests.identity.conftest import TestApp, create_test_app
from tests.identity.support import ext, failure, item_failure, new_id
from tests.journey.support import (
    SendFeed,
    create_active,
    definition,
    exit_node,
    node,
    seconds,
    send,
)
from tests.journey.test_lifecycle import add, state
from tests.journey.test_send_flow import make_users
from tests.polling import eventually


def s(value: str) -> user_pb2.AttributeValue:
    return user_pb2.AttributeValue(string_value=value)


async def test_branch_split_and_update_profile(
    journeys: Any, users: Any, app: TestApp, feed: SendFeed
) -> None:
    gold = await make_users(users, app, 3, attributes={"plan": s("gold")})
    free = await make_users(users, app, 3, attributes={"plan": s("free")})
    condition = segment_pb2.Condition(
        attribute=segment_pb2.AttributeCondition(
            field="attributes.plan", operator=segment_pb2.OPERATOR_EQUALS, values=[s("gold")]
        )
    )
    d = definition(
        node(
            "plan", branch=jpb.BranchNode(condition=condition), next={"true": "vip", "false": "ab"}
        ),
        node(
            "vip",
            update_profile=jpb.UpdateProfileNode(attributes={"vip_journey": s("yes")}),
            next={"next": "vip_send"},
        ),
        send("vip_send", template="tpl-vip", next="end"),
        node(
            "ab",
            split=jpb.SplitNode(
                branches=[
                    jpb.SplitBranch(output="a", weight=1),
                    jpb.SplitBranch(output="b", weight=1),
                ]
            ),
            next={"a": "send_a", "b": "send_b"},
        ),
        send("send_a", template="tpl-a", next="end"),
        send("send_b", template="tpl-b", next="end"),
        exit_node("end"),
    )
    journey = await create_active(journeys, app.server, d)
    jid = journey.journey_id
    await add(journeys, app, jid, gold + free)
    vip = await feed.wait_for(3, jid, "vip_send")
    assert sorted(r.user_id for r in vip) == sorted(gold)
    await feed.wait_for(3, jid)
    await eventually(lambda: _count(feed, jid, 6))
    split = [r for r in feed.of(jid) if r.journey_node_id in ("send_a", "send_b")]
    assert sorted(r.user_id for r in split) == sorted(free)
    # The attribute was written through identity.
    profile = await users.GetUser(
        ipb.GetUserRequest(ref=user_ref_pb2.UserRef(user_id=gold[0])), metadata=app.server
    )
    assert profile.attributes["vip_journey"].string_value == "yes"
    # Each customer's split is the same on every visit: the path says which.
    for user_id in free:
        path = (await state(journeys, app, jid, user_id)).path
        taken = next(p.output for p in path if p.node_id == "ab")
        sent = next(r.journey_node_id for r in split if r.user_id == user_id)
        assert sent == f"send_{taken}"


async def test_a_refused_profile_write_moves_the_customer_out_with_the_reason(
    journeys: Any, users: Any, identity_channel_j: grpc.aio.Channel
) -> None:
    strict = await create_test_app(
        apps_service_pb2_grpc.AppsServiceStub(identity_channel_j),
        app_pb2.AppSettings(undefined_fields=app_pb2.UNDEFINED_FIELD_POLICY_REJECT),
    )
    (user_id,) = await make_users(users, strict, 1)
    d = definition(
        node(
            "tag",
            update_profile=jpb.UpdateProfileNode(attributes={"never_defined": s("yes")}),
            next={"next": "after"},
        ),
        send("after", next="end"),
        exit_node("end"),
    )
    journey = await create_active(journeys, strict.server, d)
    jid = journey.journey_id
    async with SendFeed(strict.app_id) as sends:
        await add(journeys, strict, jid, [user_id])
        exited = await eventually(lambda: _exited(journeys, strict, jid, user_id), within=10)
        await sends.settle(0.5)
    assert exited is not None
    # Identity refuses the undefined field: retrying would never help, so the customer leaves
    # at once (not every 15 s for ever) and the path says why; nothing after the node runs.
    assert [(p.node_id, p.output) for p in exited.path] == [("tag", "(refused)")]
    assert sends.of(jid) == []
    stats = await journeys.GetJourneyStats(
        pb.GetJourneyStatsRequest(journey_id=jid), metadata=strict.server
    )
    tag = next(n for n in stats.nodes if n.node_id == "tag")
    assert (tag.entered, tag.exited, tag.waiting) == (1, 1, 0)


async def test_a_refused_profile_write_takes_the_failure_output_when_wired(
    journeys: Any, users: Any, identity_channel_j: grpc.aio.Channel
) -> None:
    strict = await create_test_app(
        apps_service_pb2_grpc.AppsServiceStub(identity_channel_j),
        app_pb2.AppSettings(undefined_fields=app_pb2.UNDEFINED_FIELD_POLICY_REJECT),
    )
    (user_id,) = await make_users(users, strict, 1)
    d = definition(
        node(
            "tag",
            update_profile=jpb.UpdateProfileNode(attributes={"never_defined": s("yes")}),
            next={"next": "after", "failure": "fallback"},
        ),
        send("after", next="end"),
        send("fallback", template="tpl-fallback", next="end"),
        exit_node("end"),
    )
    journey = await create_active(journeys, strict.server, d)
    jid = journey.journey_id
    async with SendFeed(strict.app_id) as sends:
        await add(journeys, strict, jid, [user_id])
        [sent] = await sends.wait_for(1, jid)
        exited = await eventually(lambda: _exited(journeys, strict, jid, user_id), within=10)
        await sends.settle(0.5)
    assert (sent.user_id, sent.journey_node_id) == (user_id, "fallback")
    assert len(sends.of(jid)) == 1
    assert exited is not None
    assert [p.node_id for p in exited.path] == ["tag", "fallback", "end"]
    assert exited.path[0].output == "failure"
    stats = await journeys.GetJourneyStats(
        pb.GetJourneyStatsRequest(journey_id=jid), metadata=strict.server
    )
    tag = next(n for n in stats.nodes if n.node_id == "tag")
    assert dict((o.output, o.count) for o in tag.outputs) == {"failure": 1}


async def _exited(journeys: Any, app: TestApp, jid: str, user_id: str) -> pb.CustomerState | None:
    """The customer's state once exited; None before."""
    found = await state(journeys, app, jid, user_id)
    return found if found.status == pb.CustomerState.STATUS_EXITED else None


async def _count(feed: SendFeed, jid: str, count: int) -> bool:
    await feed.poll()
    return len(feed.of(jid)) >= count


class HookServer:
    """A local HTTP endpoint that records requests; ``/fail`` answers 500.

    Args:
        keep_alive: Serve further requests on a connection (HTTP/1.1 keep-alive) rather than
            close it after one answer.
    """

    def __init__(self, *, keep_alive: bool = False) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.connections = 0
        self.port = 0
        self._keep_alive = keep_alive

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                target = lines[0].split(" ")[1]
                headers = {
                    k.lower(): v.strip()
                    for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append((target, headers, body))
                status = "500 Oops" if target.startswith("/fail") else "200 OK"
                close = "" if self._keep_alive else "Connection: close\r\n"
                writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n{close}\r\n".encode())
                await writer.drain()
                if not self._keep_alive:
                    return
        except asyncio.IncompleteReadError:
            return  # the client closed the connection
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[HookServer]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            await server.wait_closed()


async def test_webhook_is_templated_signed_and_branches_on_the_answer(
    journeys: Any, users: Any, app: TestApp, feed: SendFeed
) -> None:
    (user_id,) = await make_users(users, app, 1)
    async with HookServer().running() as hooks:
        base = f"http://127.0.0.1:{hooks.port}"
        d = definition(
            node(
                "hook",
                webhook=jpb.WebhookNode(
                    url=base + "/crm/{{ user.user_id }}",
                    body='{"name": "{{ user.first_name }}", "journey": "{{ journey.id }}"}',
                    headers={"X-Plan": "basic"},
                    secret="s3cret",
                ),
                next={"success": "failing", "failure": "end"},
            ),
            node(
                "failing",
                webhook=jpb.WebhookNode(url=base + "/fail", method="PUT"),
                next={"success": "end", "failure": "after_failure"},
            ),
            send("after_failure", next="end"),
            exit_node("end"),
        )
        journey = await create_active(journeys, app.server, d)
        await add(journeys, app, journey.journey_id, [user_id])
        [sent] = await feed.wait_for(1, journey.journey_id, "after_failure")
        assert sent.user_id == user_id
    (target, headers, body), (fail_target, _, _) = hooks.requests
    assert target == f"/crm/{user_id}"
    assert fail_target == "/fail"
    assert json.loads(body) == {"name": "Ana", "journey": journey.journey_id}
    assert headers["x-plan"] == "basic"
    stamp, mac = (part.split("=", 1)[1] for part in headers["x-tidings-signature"].split(","))
    expected = hmac.new(b"s3cret", f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    assert mac == expected
    assert headers["x-tidings-idempotency-key"].startswith(f"{journey.journey_id}/{user_id}/")


async def test_webhook_calls_reuse_the_engine_s_connections(
    journeys: Any, users: Any, app: TestApp, feed: SendFeed
) -> None:
    (user_id,) = await make_users(users, app, 1)
    async with HookServer(keep_alive=True).running() as hooks:
        base = f"http://127.0.0.1:{hooks.port}"
        d = definition(
            node(
                "first",
                webhook=jpb.WebhookNode(url=base + "/one", headers={"Host": "evil.example"}),
                next={"success": "second", "failure": "end"},
            ),
            node(
                "second",
                webhook=jpb.WebhookNode(url=base + "/two"),
                next={"success": "done", "failure": "end"},
            ),
            send("done", next="end"),
            exit_node("end"),
        )
        journey = await create_active(journeys, app.server, d)
        await add(journeys, app, journey.journey_id, [user_id])
        await feed.wait_for(1, journey.journey_id, "done")
    assert [target for target, _, _ in hooks.requests] == ["/one", "/two"]
    # The second call went over the first one's connection (one client per engine process).
    assert hooks.connections == 1
    # The client writes Host itself: a template's Host header does not reach the endpoint.
    assert hooks.requests[0][1]["host"] == f"127.0.0.1:{hooks.port}"


async def test_date_attribute_delay_in_the_past_does_not_wait(
    journeys: Any, users: Any, app: TestApp, feed: SendFeed
) -> None:
    past = Timestamp()
    past.FromDatetime(datetime.now(UTC) - timedelta(days=3))
    future = Timestamp()
    future.FromDatetime(datetime.now(UTC) + timedelta(days=30))
    (due,) = await make_users(
        users, app, 1, attributes={"renewal_at": user_pb2.AttributeValue(timestamp_value=past)}
    )
    (later,) = await make_users(
        users, app, 1, attributes={"renewal_at": user_pb2.AttributeValue(timestamp_value=future)}
    )
    d = definition(
        node(
            "until",
            delay=jpb.DelayNode(
                until_date_attribute=jpb.DelayNode.UntilDateAttribute(
                    attribute="attributes.renewal_at", offset=seconds(-86400)
                )
            ),
            next={"next": "renew"},
        ),
        send("renew", next="end"),
        exit_node("end"),
    )
    journey = await create_active(journeys, app.server, d)
    await add(journeys, app, journey.journey_id, [due, later])
    [sent] = await feed.wait_for(1, journey.journey_id)
    assert sent.user_id == due
    waiting = await state(journeys, app, journey.journey_id, later)
    assert waiting.status == pb.CustomerState.STATUS_WAITING
    assert waiting.waiting_for == "timer"
    expected = future.ToDatetime(tzinfo=UTC) - timedelta(days=1)
    assert abs(waiting.wake_time.ToDatetime(tzinfo=UTC) - expected) < timedelta(seconds=1)


async def test_date_field_delay_waits_until_the_customers_local_midnight_of_that_day(
    journeys: Any, users: Any, app: TestApp, feed: SendFeed
) -> None:
    await users.CreateCustomerField(
        ipb.CreateCustomerFieldRequest(
            field=customer_field_pb2.CustomerField(
                name="renews_on", type=customer_field_pb2.FIELD_TYPE_DATE
            )
        ),
        metadata=app.server,
    )
    day = (datetime.now(UTC) + timedelta(days=10)).date()
    (later,) = await make_users(
        users,
        app,
        1,
        timezone="America/New_York",
        attributes={"renews_on": user_pb2.AttributeValue(string_value=day.isoformat())},
    )
    d = definition(
        node(
            "until",
            delay=jpb.DelayNode(
                until_date_attribute=jpb.DelayNode.UntilDateAttribute(
                    attribute="attributes.renews_on", offset=seconds(-86400)
                )
            ),
            next={"next": "renew"},
        ),
        send("renew", next="end"),
        exit_node("end"),
    )
    journey = await create_active(journeys, app.server, d)
    await add(journeys, app, journey.journey_id, [later])
    waiting = await state(journeys, app, journey.journey_id, later)
    assert (waiting.status, waiting.waiting_for) == (pb.CustomerState.STATUS_WAITING, "timer")
    # The day before, at midnight in New York (04:00 or 05:00 UTC), not at midnight UTC.
    new_york = ZoneInfo("America/New_York")
    midnight = datetime.combine(day, datetime.min.time(), tzinfo=new_york).astimezone(UTC)
    assert waiting.wake_time.ToDatetime(tzinfo=UTC) == midnight - timedelta(days=1)


async def test_reentry_once_concurrency_limit_and_state_api(
    journeys: Any, users: Any, app: TestApp, feed: SendFeed
) -> None:
    people = await make_users(users, app, 3)
    d = definition(
        node("hold", delay=jpb.DelayNode(duration=seconds(3600)), next={"next": "poke"}),
        send("poke", next="end"),
        exit_node("end"),
        max_concurrent_customers=2,
    )
    journey = await create_active(journeys, app.server, d)
    jid = journey.journey_id
    added = await add(journeys, app, jid, people)
    assert [r.entered for r in added.results] == [True, True, False]
    limit = item_failure(added.results[2].error)
    assert (limit.code, limit.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CONCURRENCY_LIMIT")

    listed = await journeys.ListCustomerStates(
        pb.ListCustomerStatesRequest(journey_id=jid, node_id="hold", page_size=1),
        metadata=app.server,
    )
    rest = await journeys.ListCustomerStates(
        pb.ListCustomerStatesRequest(
            journey_id=jid, node_id="hold", page_token=listed.next_page_token
        ),
        metadata=app.server,
    )
    assert sorted(x.user_id for x in [*listed.states, *rest.states]) == sorted(people[:2])

    # Put moves a customer at once; Delete takes one out and frees a place.
    moved = await journeys.PutCustomerState(
        pb.PutCustomerStateRequest(
            journey_id=jid, customer=user_ref_pb2.UserRef(user_id=people[0]), node_id="poke"
        ),
        metadata=app.server,
    )
    assert moved.node_id == "poke"
    assert next((p.node_id, p.output) for p in moved.path) == ("hold", "(moved)")
    [poked] = await feed.wait_for(1, jid, "poke")
    assert poked.user_id == people[0]
    await journeys.DeleteCustomerState(
        pb.DeleteCustomerStateRequest(
            journey_id=jid, customer=user_ref_pb2.UserRef(user_id=people[1])
        ),
        metadata=app.server,
    )
    removed = await state(journeys, app, jid, people[1])
    assert removed.status == pb.CustomerState.STATUS_EXITED
    assert removed.path[-1].output == "(removed)"

    async def exited() -> bool:
        return (await state(journeys, app, jid, people[0])).status == pb.CustomerState.STATUS_EXITED

    await eventually(exited)
    again = await add(journeys, app, jid, people)
    # ONCE: the one who went through may not come back; the removed one and the refused one may.
    assert [r.entered for r in again.results] == [False, True, True]
    refused = item_failure(again.results[0].error)
    assert (refused.code, refused.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "REENTRY_REFUSED",
    )
    inside = item_failure((await add(journeys, app, jid, people[1:2])).results[0].error)
    assert (inside.code, inside.reason) == (grpc.StatusCode.ALREADY_EXISTS, "ALREADY_INSIDE")
    unknown = await failure(
        journeys.PutCustomerState(
            pb.PutCustomerStateRequest(
                journey_id=jid, customer=user_ref_pb2.UserRef(user_id=people[0]), node_id="ghost"
            ),
            metadata=app.server,
        )
    )
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "NODE_NOT_FOUND")
    nobody = await failure(
        journeys.GetCustomerState(
            pb.GetCustomerStateRequest(journey_id=jid, customer=ext(new_id())),
            metadata=app.server,
        )
    )
    assert nobody.code == grpc.StatusCode.NOT_FOUND
    stats = await journeys.GetJourneyStats(
        pb.GetJourneyStatsRequest(journey_id=jid), metadata=app.server
    )
    assert stats.entries_refused == 3  # the concurrency limit, the re-entry rule, inside


async def _add_as(
    journeys: Any, app: TestApp, jid: str, user_id: str, request_id: str
) -> pb.EntryResult:
    """AddCustomers of one customer under ``request_id``; that customer's result."""
    response = await journeys.AddCustomers(
        pb.AddCustomersRequest(
            journey_id=jid,
            customers=[user_ref_pb2.UserRef(user_id=user_id)],
            request_id=request_id,
        ),
        metadata=app.server,
    )
    result: pb.EntryResult = response.results[0]
    return result


async def _move_out(journeys: Any, app: TestApp, jid: str, user_id: str) -> None:
    """Send a customer to the exit node and wait until the engine has taken them out."""
    await journeys.PutCustomerState(
        pb.PutCustomerStateRequest(
            journey_id=jid, customer=user_ref_pb2.UserRef(user_id=user_id), node_id="end"
        ),
        metadata=app.server,
    )
    await eventually(lambda: _exited(journeys, app, jid, user_id), what="customer exited")


async def test_a_full_or_paused_journey_does_not_use_up_the_trigger(
    journeys: Any, users: Any, app: TestApp
) -> None:
    a, b, c = await make_users(users, app, 3)
    d = definition(
        node("hold", delay=jpb.DelayNode(duration=seconds(3600)), next={"next": "end"}),
        exit_node("end"),
        max_concurrent_customers=1,
    )
    jid = (await create_active(journeys, app.server, d)).journey_id
    assert (await _add_as(journeys, app, jid, a, "add-a")).entered
    full = item_failure((await _add_as(journeys, app, jid, b, "add-b")).error)
    assert (full.code, full.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CONCURRENCY_LIMIT")

    await _move_out(journeys, app, jid, a)
    # The same request, retried once there is room, enters; retried again, it is a duplicate.
    assert (await _add_as(journeys, app, jid, b, "add-b")).entered
    twice = item_failure((await _add_as(journeys, app, jid, b, "add-b")).error)
    assert (twice.code, twice.reason) == (grpc.StatusCode.ALREADY_EXISTS, "DUPLICATE_TRIGGER")

    # Paused: the call is refused as a whole and nothing is recorded, so it enters after Resume.
    await journeys.PauseJourney(pb.PauseJourneyRequest(journey_id=jid), metadata=app.server)
    paused = await failure(_add_as(journeys, app, jid, c, "add-c"))
    assert (paused.code, paused.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "JOURNEY_NOT_ACTIVE",
    )
    await journeys.ResumeJourney(pb.ResumeJourneyRequest(journey_id=jid), metadata=app.server)
    await _move_out(journeys, app, jid, b)
    assert (await _add_as(journeys, app, jid, c, "add-c")).entered

    # One row per customer and trigger, with the latest outcome: B's refusal became an entry.
    stats = await journeys.GetJourneyStats(
        pb.GetJourneyStatsRequest(journey_id=jid), metadata=app.server
    )
    assert (stats.entered, stats.entries_refused) == (3, 0)
