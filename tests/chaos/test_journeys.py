"""Scenario 2: customers go entry → send → wait → send while the two journey engines are
SIGKILLed (and one SIGSTOPped) at random points; delivery sends both steps to the sink.

Pass: every customer got exactly one ``first`` and one ``second`` at the sink (0 lost, 0
duplicated, nothing else), and each customer's wait, measured between the engine's two send
requests on ``delivery.requests``, lasted at least its delay and at most delay + the engines'
downtime + a margin for a loaded machine.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime

import grpc.aio
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from tidings.delivery.v1 import channel_pb2, template_pb2
from tidings.delivery.v1 import delivery_service_pb2 as dpb
from tidings.identity.v1 import user_ref_pb2
from tidings.journey.v1 import journey_pb2 as jpb
from tidings.journey.v1 import journey_service_pb2 as pb

from services.runtime.kafka import DELIVERY_REQUESTS
from tests.chaos.checker import check_deliveries
from tests.chaos.cluster import Cluster, Member
from tests.chaos.conftest import SIZE, new_verdict, scenario_rng
from tests.chaos.faults import FaultRunner, plan, running
from tests.chaos.sinks import FaultySink
from tests.chaos.stack import PrivateStack
from tests.chaos.support import (
    call_any,
    make_users,
    say,
    start_deliveries,
    until_done_or_stalled,
    webhook_channel,
)
from tests.delivery.support import webhook
from tests.identity.conftest import TestApp
from tests.journey.support import (
    create_active,
    definition,
    exit_node,
    journey_stub,
    node,
    seconds,
    send,
)
from tests.runtime.kafka_helpers import partitions_of

pytestmark = pytest.mark.timeout(SIZE.timeout)

#: Beyond delay + downtime, what a wait may take on a loaded 2-core machine (claim loop wake-up,
#: the relay, a replacement engine's start-up).
WAIT_MARGIN = 15.0
ENGINES = 2


def journey_settings(identity: Member, delivery: Member) -> dict[str, str]:
    return {
        "TIDINGS_IDENTITY_TARGET": identity.target,
        "TIDINGS_DELIVERY_TARGET": delivery.target,
        "TIDINGS_ENGINE_IDLE_WAIT": "0.05",
        "TIDINGS_ENGINE_BATCH": "20",
        "TIDINGS_LOG_LEVEL": "WARNING",
    }


async def start_engines(
    cluster: Cluster, identity: Member, delivery: Member, database_url: str, count: int
) -> list[Member]:
    """Journey processes sharing one database (engines split the customers by SKIP LOCKED)."""
    return [
        await cluster.start(
            cluster.next_label("journey"),
            "journey",
            database_url,
            journey_settings(identity, delivery),
        )
        for _ in range(count)
    ]


def wait_node(node_id: str, length: float, on_timeout: str) -> jpb.Node:
    """Wait ``length`` seconds (for an event nobody sends), then go to ``on_timeout``."""
    return node(
        node_id,
        wait_for_event=jpb.WaitForEventNode(
            event=jpb.Entry.CustomEvent(name="never-sent"), timeout=seconds(length)
        ),
        next={"event": "end", "timeout": on_timeout},
    )


async def _template(members: list[Member], app: TestApp, url: str, node_name: str) -> str:
    body = '{"u": "{{ user.user_id }}", "n": "' + node_name + '"}'
    created = await call_any(
        members,
        lambda stub: stub.CreateTemplate(
            dpb.CreateTemplateRequest(
                template=template_pb2.Template(
                    display_name=f"{node_name}-{uuid.uuid4().hex[:6]}",
                    channel=channel_pb2.CHANNEL_WEBHOOK,
                    content=webhook(url, body=body),
                )
            ),
            metadata=app.server,
            timeout=30,
        ),
    )
    return str(created.template_id)


class RequestTimes:
    """When the engine asked for each send: ``occurred_at`` of each ``delivery.requests``
    record of one journey, by (user, node) (read_committed, as delivery reads them)."""

    def __init__(self, bootstrap: str, journey_id: str) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
        )
        self._journey_id = journey_id
        self._bootstrap = bootstrap
        self.times: dict[tuple[str, str], list[datetime]] = {}

    async def read_all(self) -> None:
        await self._consumer.start()
        try:
            partitions = await partitions_of(self._bootstrap, DELIVERY_REQUESTS.name)
            tps = [TopicPartition(DELIVERY_REQUESTS.name, p) for p in sorted(partitions)]
            assert tps, "delivery.requests has no partitions"
            self._consumer.assign(tps)
            await self._consumer.seek_to_beginning(*tps)
            ends = await self._consumer.end_offsets(tps)
            while [tp for tp in tps if await self._consumer.position(tp) < ends[tp]]:
                batches = await self._consumer.getmany(timeout_ms=500, max_records=5000)
                for records in batches.values():
                    for record in records:
                        if record.value is None:
                            continue
                        request = DELIVERY_REQUESTS.decode(record.value)
                        if request.journey_id != self._journey_id or request.dispatch:
                            continue
                        key = (request.user_id, request.journey_node_id)
                        self.times.setdefault(key, []).append(request.occurred_at.ToDatetime(UTC))
        finally:
            await self._consumer.stop()


async def test_journey_sends_once_per_step_and_waits_its_delay_through_engine_kills(
    stack: PrivateStack, cluster: Cluster, identity: Member, app: TestApp
) -> None:
    customers, wait = SIZE.customers, SIZE.wait_seconds
    rng = scenario_rng("journeys")
    verdict = new_verdict("2 journeys (engine kills)", customers * 2)
    users = await make_users(identity, app, customers, prefix="j")
    [delivery] = await start_deliveries(
        cluster, identity, await stack.postgres.create_database(), 1
    )
    engines = await start_engines(
        cluster, identity, delivery, await stack.postgres.create_database(), ENGINES
    )
    async with FaultySink(seed=rng.randrange(1 << 30)) as sink:
        await webhook_channel([delivery], app)
        first = await _template([delivery], app, f"{sink.url}/j", "first")
        second = await _template([delivery], app, f"{sink.url}/j", "second")
        async with grpc.aio.insecure_channel(engines[0].target) as channel:
            journey = await create_active(
                journey_stub(channel),
                app.server,
                definition(
                    send("first", first, ("webhook",), next="wait"),
                    # A delay node's minimum is a minute; a wait for an event that never
                    # comes times out after `wait` seconds and goes on the same way.
                    wait_node("wait", wait, on_timeout="second"),
                    send("second", second, ("webhook",), next="end"),
                    exit_node("end"),
                ),
            )
        labels = tuple(m.label for m in engines)
        # Every customer's `first` goes out at once, then they all wait: marks up to 50% fire
        # while the timers run out, so kills hit due timers, claims and the relay.
        faults = plan(
            rng,
            kill_targets=labels,
            kill_count=SIZE.engine_kills,
            pauses=labels[:1],
            span=(0.02, 0.5),
        )

        async def progress() -> float:
            return sink.delivered() / (2 * customers)

        runner = FaultRunner(cluster, faults, progress)
        started = time.monotonic()
        async with running(runner, within=SIZE.timeout):
            for start in range(0, customers, 500):
                refs = [user_ref_pb2.UserRef(user_id=u) for u in users[start : start + 500]]

                async def add(stub: object, refs: list[user_ref_pb2.UserRef] = refs) -> object:
                    return await stub.AddCustomers(  # type: ignore[attr-defined]
                        pb.AddCustomersRequest(journey_id=journey.journey_id, customers=refs),
                        metadata=app.server,
                        timeout=60,
                    )

                # A retried call (its engine died) finds some already in: not an error; the
                # checker proves each customer went through once.
                await _on_any_engine(cluster, add)

            async def everyone_done() -> bool:
                return sink.delivered() >= 2 * customers and runner.fired == len(faults)

            await until_done_or_stalled(
                everyone_done, progress, stall=60 + wait, within=SIZE.timeout
            )
        await _quiet(sink)
        say(f"journeys: {sink.delivered()} sends in {time.monotonic() - started:.0f}s")
        times = RequestTimes(stack.kafka.bootstrap, journey.journey_id)
        await times.read_all()
    expected = {f"{u}/{node}": 1 for u in users for node in ("first", "second")}
    check_deliveries(verdict, expected, sink.calls, step_of="node")
    downtime = sum(runner.downtime.values())
    longest = 0.0
    for user in users:
        firsts, seconds_ = times.times.get((user, "first")), times.times.get((user, "second"))
        if not firsts or not seconds_:
            continue  # a missing send is already reported as lost
        waited = (min(seconds_) - min(firsts)).total_seconds()
        longest = max(longest, waited)
        if waited < wait:
            verdict.other.append(f"{user}: waited {waited:.2f}s, less than the {wait}s delay")
        elif waited > wait + downtime + WAIT_MARGIN:
            verdict.other.append(
                f"{user}: waited {waited:.1f}s, more than {wait}s + {downtime:.1f}s downtime "
                f"+ {WAIT_MARGIN}s"
            )
    verdict.notes.update(
        faults=runner.describe(), downtime_s=round(downtime, 1), longest_wait_s=round(longest, 1)
    )
    assert runner.fired == len(faults)
    assert verdict.passed, verdict.explain()


async def _on_any_engine(cluster: Cluster, call: object) -> object:
    """Call the journey API on an engine that is up (one may be down or frozen right now)."""
    deadline = time.monotonic() + 120
    while True:
        for member in cluster.of("journey"):
            if member.stopped or member.process.process.returncode is not None:
                continue
            async with grpc.aio.insecure_channel(member.target) as channel:
                try:
                    return await call(journey_stub(channel))  # type: ignore[operator]
                except grpc.aio.AioRpcError as error:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"no engine took the call: {error}") from error
        await asyncio.sleep(0.5)


async def _quiet(sink: FaultySink) -> None:
    """Until two seconds pass without a call (a late duplicate would show up here)."""
    while True:
        before = len(sink.calls)
        await asyncio.sleep(2)
        if len(sink.calls) == before:
            return
