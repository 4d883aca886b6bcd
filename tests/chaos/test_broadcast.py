"""Scenario 1: a broadcast of N messages through three delivery processes while K of them are
SIGKILLed at random points, the Kafka broker restarts once, and the provider answers a few
calls with 429, 503, a hang or a dropped connection.

Pass: at the sink every user's message was delivered (answered 200) exactly once: 0 lost,
0 duplicated (no user with two keys; no key called again after its 200 unless delivery's ledger
declares that key resent after an unknown outcome — a killed worker's webhook call in flight —
which the receiver drops by ``Idempotency-Key``), 0 unexpected.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.chaos.checker import check_deliveries
from tests.chaos.cluster import Cluster, Member
from tests.chaos.conftest import SIZE, new_verdict, scenario_rng
from tests.chaos.faults import BROKER_RESTART, FaultRunner, plan, running
from tests.chaos.sinks import FaultRates, FaultySink
from tests.chaos.stack import PrivateStack
from tests.chaos.support import (
    broadcast_all,
    broadcast_settled,
    expect_no_loss_or_duplicate,
    ledger_reasons,
    lost_users,
    make_users,
    message_states,
    resent_keys,
    start_deliveries,
    until,
    until_done_or_stalled,
    webhook_channel,
)
from tests.identity.conftest import TestApp

pytestmark = pytest.mark.timeout(SIZE.timeout)

#: A few bad provider answers, each retried with the same key (hangs cost a 2 s timeout each).
#: How long progress may stand still (after every fault) before the run is judged as it is.
STALL_SECONDS = 45.0
PROVIDER_FAULTS = FaultRates(too_many=0.004, unavailable=0.004, hang=0.0004, drop=0.002)


async def test_broadcast_is_delivered_exactly_once_through_kills_and_a_broker_restart(
    stack: PrivateStack, cluster: Cluster, identity: Member, app: TestApp
) -> None:
    total, kills = SIZE.broadcast, SIZE.broadcast_kills
    rng = scenario_rng("broadcast")
    verdict = new_verdict("1 broadcast (kills, broker restart)", total)
    users = await make_users(identity, app, total)
    database = await stack.postgres.create_database()
    members = await start_deliveries(cluster, identity, database, 3)
    async with FaultySink(seed=rng.randrange(1 << 30), rates=PROVIDER_FAULTS) as sink:
        await webhook_channel(members, app)
        faults = plan(
            rng,
            kill_targets=tuple(m.label for m in members),
            kill_count=kills,
            broker=(BROKER_RESTART,),
        )

        async def progress() -> float:
            return sink.delivered() / total

        runner = FaultRunner(cluster, faults, progress)
        async with running(runner, within=SIZE.timeout):
            broadcast_id = await broadcast_all(members, app, f"{sink.url}/b")

            async def settled() -> bool:
                return await broadcast_settled(members, app, broadcast_id, total) is not None

            # Faults first (the runner fires them all), then every message settled.
            await until(
                lambda: _true(runner.fired == len(faults)),
                within=SIZE.timeout,
                what="every fault fired",
            )
            finished = await until_done_or_stalled(
                settled, progress, stall=STALL_SECONDS, within=SIZE.timeout
            )
        # The faults are over and every message is settled; keep listening a moment so a
        # late second call (a duplicate) would still be seen.
        settled_calls = len(sink.calls)
        await until(lambda: _quiet(sink, settled_calls), within=30, what="the sink going quiet")
        verdict.notes.update(
            faults=runner.describe(),
            provider_answers=dict(sink.answers),
            ledger_reasons=await ledger_reasons(database),
            settled=finished,
        )
    check_deliveries(
        verdict,
        dict.fromkeys(users, 1),
        sink.calls,
        step_of="user",
        resent=await resent_keys(database),
    )
    assert runner.fired == len(faults)
    expect_no_loss_or_duplicate(verdict, await message_states(database, lost_users(verdict)))


async def _true(value: bool) -> bool:
    return value


async def _quiet(sink: FaultySink, seen: int) -> bool:
    """Two seconds without a call after the broadcast settled."""
    before = len(sink.calls)
    await asyncio.sleep(2)
    return len(sink.calls) == before and before >= seen
