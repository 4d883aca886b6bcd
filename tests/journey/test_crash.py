"""Exactly once under fire: two engine replicas SIGKILLed at random points while customers move.

Every step of every customer happens once: counted on ``delivery.requests`` by idempotency key,
no send is requested twice and none is lost, whatever the kills interrupted (a claim, the outbox
relay between its Kafka commit and its delete, a consumer).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc.aio
from tidings.identity.v1 import user_ref_pb2
from tidings.journey.v1 import journey_pb2 as jpb
from tidings.journey.v1 import journey_service_pb2 as pb

from tests.conftest import temporary_database
from tests.e2e.processes import ServiceProcess, start_service
from tests.identity.conftest import TestApp
from tests.journey.support import (
    SendFeed,
    create_active,
    definition,
    exit_node,
    journey_env,
    journey_stub,
    node,
    seconds,
    send,
)
from tests.journey.test_send_flow import make_users

CUSTOMERS = 1500
KILLS = 8


def crash_journey() -> jpb.JourneyDefinition:
    return definition(
        send("first", next="second"),
        send("second", next="wait"),
        node(
            "wait",
            wait_for_event=jpb.WaitForEventNode(
                event=jpb.Entry.CustomEvent(name="never"), timeout=seconds(1)
            ),
            next={"event": "end", "timeout": "split"},
        ),
        node(
            "split",
            split=jpb.SplitNode(
                branches=[
                    jpb.SplitBranch(output="a", weight=1),
                    jpb.SplitBranch(output="b", weight=1),
                ]
            ),
            next={"a": "third_a", "b": "third_b"},
        ),
        send("third_a", next="end"),
        send("third_b", next="end"),
        exit_node("end"),
    )


async def _start(identity: ServiceProcess, dsn: str, log_dir: Path) -> ServiceProcess:
    service = await start_service(
        "journey",
        database_url=dsn,
        log_dir=log_dir,
        env=journey_env(identity, engine_batch="25", engine_workers="2"),
    )
    await service.wait_serving(within=60)
    return service


async def test_sigkill_at_random_points_loses_and_repeats_no_send(
    identity_service: ServiceProcess, users: Any, app: TestApp, feed: SendFeed, tmp_path: Path
) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    user_ids = await make_users(users, app, CUSTOMERS)
    async with temporary_database() as dsn:
        replicas = [await _start(identity_service, dsn, tmp_path) for _ in range(2)]
        try:
            async with grpc.aio.insecure_channel(replicas[0].grpc_target) as channel:
                stub = journey_stub(channel)
                journey = await create_active(stub, app.server, crash_journey())
                for start in range(0, CUSTOMERS, 1000):
                    response = await stub.AddCustomers(
                        pb.AddCustomersRequest(
                            journey_id=journey.journey_id,
                            customers=[
                                user_ref_pb2.UserRef(user_id=u)
                                for u in user_ids[start : start + 1000]
                            ],
                        ),
                        metadata=app.server,
                    )
                    assert all(r.entered for r in response.results)
            kills = 0
            progress: list[int] = []
            deadline = time.monotonic() + 240
            while kills < KILLS:
                assert time.monotonic() < deadline, "the kill loop took too long"
                await asyncio.sleep(rng.uniform(0.05, 0.8))
                await feed.poll()
                progress.append(len(feed.of(journey.journey_id)))
                victim = rng.randrange(2)
                await replicas[victim].kill()
                kills += 1
                replicas[victim] = await _start(identity_service, dsn, tmp_path)
            # Let the survivors finish everyone.
            await feed.wait_for(CUSTOMERS * 3, journey.journey_id, within=180)
            await feed.settle(3)
        finally:
            for replica in replicas:
                await replica.kill()
    requests = feed.of(journey.journey_id)
    per_key = Counter(r.idempotency_key for r in requests)
    duplicates = {k: n for k, n in per_key.items() if n > 1}
    assert not duplicates, f"seed {seed}: sent twice: {list(duplicates)[:5]}"
    per_user: dict[str, list[str]] = {}
    for r in requests:
        per_user.setdefault(r.user_id, []).append(r.journey_node_id)
    assert set(per_user) == set(user_ids), f"seed {seed}"
    for user_id, nodes in per_user.items():
        assert sorted(nodes)[:2] == ["first", "second"], f"seed {seed}: {user_id} got {nodes}"
        assert len(nodes) == 3, f"seed {seed}: {nodes}"
        assert nodes[2] in ("third_a", "third_b"), f"seed {seed}: {nodes}"
    # The kills did land while customers were moving, not only before or after.
    assert any(0 < done < CUSTOMERS * 3 for done in progress), progress
