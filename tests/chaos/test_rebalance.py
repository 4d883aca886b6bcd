"""Scenario 4: the delivery worker group rebalances under load. While a broadcast is sent,
members join and leave (SIGTERM) every few seconds, and one member is frozen (SIGSTOP) for
longer than the consumer session timeout, so the group moves its partitions away, and then
woken (SIGCONT) with its old batch still in hand.

Pass: no effect applied twice: no provider call for a key after its 200 (unless delivery's
ledger declares that key resent after an unknown outcome, which the receiver drops by
``Idempotency-Key``), no user with two messages; and nothing lost.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.chaos.checker import check_deliveries
from tests.chaos.cluster import Cluster, Member
from tests.chaos.conftest import SIZE, new_verdict, scenario_rng
from tests.chaos.sinks import FaultySink
from tests.chaos.stack import PrivateStack
from tests.chaos.support import (
    broadcast_all,
    broadcast_settled,
    expect_no_loss_or_duplicate,
    lost_users,
    make_users,
    message_states,
    resent_keys,
    say,
    start_deliveries,
    until_done_or_stalled,
    webhook_channel,
)
from tests.identity.conftest import TestApp

pytestmark = pytest.mark.timeout(SIZE.timeout)

#: aiokafka's default session timeout is 10 s: frozen longer, a member is out of the group.
FROZEN_SECONDS = 14.0


async def test_rebalances_under_load_apply_no_effect_twice(
    stack: PrivateStack, cluster: Cluster, identity: Member, app: TestApp
) -> None:
    total = SIZE.rebalance_messages
    rng = scenario_rng("rebalance")
    verdict = new_verdict("4 rebalances (join/leave/freeze)", total)
    users = await make_users(identity, app, total, prefix="r")
    database = await stack.postgres.create_database()
    # Small batches and slow answers keep work in flight across every rebalance.
    settings = {"TIDINGS_WORKER_BATCH": "200", "TIDINGS_SEND_CONCURRENCY": "8"}
    members = await start_deliveries(cluster, identity, database, 2, **settings)
    changes: list[str] = []
    async with FaultySink(seed=rng.randrange(1 << 30), delay=0.2) as sink:
        await webhook_channel(members, app)

        async def churn() -> None:
            # The freeze comes early, while the broadcast is surely still in flight.
            frozen_at = rng.randrange(min(2, SIZE.churn))
            for step in range(SIZE.churn):
                await asyncio.sleep(rng.uniform(2.0, 5.0))
                live = sorted(m.label for m in cluster.of("delivery"))
                if step == frozen_at:
                    victim = rng.choice(live)
                    changes.append(f"freeze {victim} for {FROZEN_SECONDS}s")
                    cluster.stop(victim)
                    await asyncio.sleep(FROZEN_SECONDS)
                    cluster.cont(victim)
                elif len(live) > 1 and rng.random() < 0.5:
                    victim = rng.choice(live)
                    changes.append(f"leave {victim}")
                    await cluster.remove(victim)
                else:
                    joined = await start_deliveries(cluster, identity, database, 1, **settings)
                    changes.append(f"join {joined[0].label}")
                say(f"rebalance: {changes[-1]} ({sink.delivered()} delivered)")

        started = time.monotonic()
        broadcast_id = await broadcast_all(members, app, f"{sink.url}/r")
        await churn()

        async def settled() -> bool:
            live = cluster.of("delivery")
            return await broadcast_settled(live, app, broadcast_id, total) is not None

        async def progress() -> float:
            return sink.delivered() / total

        await until_done_or_stalled(settled, progress, stall=60, within=SIZE.timeout)
        say(f"rebalance: {sink.delivered()} delivered in {time.monotonic() - started:.0f}s")
    check_deliveries(
        verdict,
        dict.fromkeys(users, 1),
        sink.calls,
        step_of="user",
        resent=await resent_keys(database),
    )
    verdict.notes.update(changes=changes)
    expect_no_loss_or_duplicate(verdict, await message_states(database, lost_users(verdict)))
