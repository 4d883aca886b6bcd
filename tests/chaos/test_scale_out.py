"""Scenario 9: scale-out. Three delivery workers and two journey engines share the work (each
does some of it), and three workers send a broadcast faster than one. Scenarios 1 and 2 run
with exactly these topologies (three workers, two engines) under faults, so "1-2 still hold"
is their pass criterion.

Throughput is compared, not measured: the provider answers after a fixed delay and each worker
has a small number of calls in flight, so the provider wait, not this machine's CPU, bounds a
worker, and three workers have three times the calls in flight. The assertion is a ratio
between two runs of the same test on the same machine, never a number of messages per second.
"""

from __future__ import annotations

import re
import time

import grpc.aio
import pytest
from tidings.identity.v1 import apps_service_pb2_grpc, user_ref_pb2
from tidings.journey.v1 import journey_service_pb2 as pb

from tests.chaos.checker import check_deliveries
from tests.chaos.cluster import Cluster, Member
from tests.chaos.conftest import SIZE, new_verdict, scenario_rng
from tests.chaos.sinks import FaultySink
from tests.chaos.stack import PrivateStack
from tests.chaos.support import (
    broadcast_all,
    broadcast_settled,
    make_users,
    say,
    start_deliveries,
    until,
    webhook_channel,
)
from tests.chaos.test_journeys import _template, start_engines, wait_node
from tests.identity.conftest import TestApp, create_test_app
from tests.journey.support import create_active, definition, exit_node, journey_stub, send

pytestmark = pytest.mark.timeout(SIZE.timeout)

#: Provider latency and calls in flight per worker: a worker sends at most about
#: CONCURRENCY / PER_CALL messages a second, whatever the CPU.
PER_CALL = 0.1
CONCURRENCY = "4"
#: Three workers must beat one by at least this factor (ideal: 3).
MIN_SPEEDUP = 1.3


async def _metric(member: Member, name: str, label: str = "") -> float:
    text = await member.process.metrics()
    total = 0.0
    for match in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        if label in (match.group(1) or ""):
            total += float(match.group(2))
    return total


async def _broadcast_rate(
    stack: PrivateStack,
    cluster: Cluster,
    identity: Member,
    app: TestApp,
    users: list[str],
    workers: int,
    seed: int,
) -> tuple[float, list[float], object]:
    """Messages a second of a broadcast through ``workers`` workers; what each sent."""
    database = await stack.postgres.create_database()
    members = await start_deliveries(
        cluster, identity, database, workers, TIDINGS_SEND_CONCURRENCY=CONCURRENCY
    )
    async with FaultySink(seed=seed, delay=PER_CALL) as sink:
        await webhook_channel(members, app)
        broadcast_id = await broadcast_all(members, app, f"{sink.url}/s{workers}")
        await until(lambda: _true(sink.delivered() > 0), within=120, what="a first delivery")
        started = time.monotonic()
        await until(
            lambda: broadcast_settled(members, app, broadcast_id, len(users)),
            within=SIZE.timeout,
            what=f"the broadcast through {workers} workers",
            every=0.5,
        )
        elapsed = time.monotonic() - started
        sent = [await _metric(m, "delivery_messages_total", 'outcome="sent"') for m in members]
        calls = list(sink.calls)
    for member in members:
        await cluster.remove(member.label)
    return len(users) / elapsed, sent, calls


async def _new_app(identity: Member) -> TestApp:
    async with grpc.aio.insecure_channel(identity.target) as channel:
        return await create_test_app(apps_service_pb2_grpc.AppsServiceStub(channel))


async def _true(value: bool) -> bool:
    return value


async def test_workers_and_engines_share_the_work_and_three_workers_beat_one(
    stack: PrivateStack, cluster: Cluster, identity: Member, app: TestApp
) -> None:
    total = SIZE.throughput_messages
    rng = scenario_rng("scale-out")
    verdict = new_verdict("9 scale-out (3 workers, 2 engines)", 3 * total)
    # One app per deployment, as in production: a new delivery database's workers start a
    # minute back on the shared topic, and another deployment's records of the *same* app
    # would be theirs to (mis)handle.
    apps = [app, await _new_app(identity), await _new_app(identity)]
    users = await make_users(identity, apps[0], total, prefix="s")
    users3 = await make_users(identity, apps[1], total, prefix="s")
    one_rate, _, one_calls = await _broadcast_rate(
        stack, cluster, identity, apps[0], users, 1, rng.randrange(1 << 30)
    )
    three_rate, sent, three_calls = await _broadcast_rate(
        stack, cluster, identity, apps[1], users3, 3, rng.randrange(1 << 30)
    )
    say(f"scale-out: 1 worker {one_rate:.0f} msg/s, 3 workers {three_rate:.0f} msg/s, {sent}")
    check_deliveries(verdict, dict.fromkeys(users, 1), one_calls, step_of="user")  # type: ignore[arg-type]
    check_deliveries(verdict, dict.fromkeys(users3, 1), three_calls, step_of="user")  # type: ignore[arg-type]
    if not all(n > 0 for n in sent):
        verdict.other.append(f"a worker sent nothing: {sent}")
    if three_rate < MIN_SPEEDUP * one_rate:
        verdict.other.append(
            f"3 workers {three_rate:.0f}/s are not {MIN_SPEEDUP}x 1 worker {one_rate:.0f}/s"
        )

    # Two engines, one journey: each engine steps some of the customers.
    app = apps[2]
    users = await make_users(identity, app, total, prefix="e")
    [delivery] = await start_deliveries(
        cluster, identity, await stack.postgres.create_database(), 1
    )
    engines = await start_engines(
        cluster, identity, delivery, await stack.postgres.create_database(), 2
    )
    async with FaultySink(seed=rng.randrange(1 << 30)) as sink:
        await webhook_channel([delivery], app)
        template = await _template([delivery], app, f"{sink.url}/e", "only")
        async with grpc.aio.insecure_channel(engines[0].target) as channel:
            stub = journey_stub(channel)
            journey = await create_active(
                stub,
                app.server,
                # Everyone becomes due at once after the wait: both engines' claim loops find
                # customers to step.
                definition(
                    wait_node("wait", 1.0, on_timeout="only"),
                    send("only", template, ("webhook",), next="end"),
                    exit_node("end"),
                ),
            )
            for start in range(0, total, 500):
                await stub.AddCustomers(
                    pb.AddCustomersRequest(
                        journey_id=journey.journey_id,
                        customers=[
                            user_ref_pb2.UserRef(user_id=u) for u in users[start : start + 500]
                        ],
                    ),
                    metadata=app.server,
                    timeout=60,
                )
        await until(
            lambda: _true(sink.delivered() >= total), within=SIZE.timeout, what="every send"
        )
        steps = [await _metric(e, "journey_sends_total") for e in engines]
        check_deliveries(verdict, {f"{u}/only": 1 for u in users}, list(sink.calls), step_of="node")
    if not all(n > 0 for n in steps):
        verdict.other.append(f"an engine sent nothing: {steps}")
    verdict.notes.update(
        one_worker_per_s=round(one_rate),
        three_workers_per_s=round(three_rate),
        sent_per_worker=sent,
        sends_per_engine=steps,
    )
    assert verdict.passed, verdict.explain()
