"""Scenario 3: identity's writes survive crashes. Clients write users, subscriptions, events and
CSV imports while identity is SIGKILLed, its Postgres crashes (immediate stop) and restarts, and
the connection between them is cut and slowed (a proxy).

Every write a client saw succeed is logged with its key. Pass: after the faults every
acknowledged write is in identity's database (an event once its consumer caught up, an
imported user once its job finished) and none is there twice.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import asyncpg
import grpc
import grpc.aio
import pytest
from tidings.identity.v1 import (
    apps_service_pb2_grpc,
    identity_service_pb2_grpc,
    import_pb2,
    user_pb2,
    user_ref_pb2,
)
from tidings.identity.v1 import identity_service_pb2 as ipb
from tidings.identity.v1 import subscription_pb2 as spb

from tests.chaos.checker import check_rows
from tests.chaos.cluster import Cluster
from tests.chaos.conftest import SIZE, new_verdict, scenario_rng
from tests.chaos.faults import CUT, PG_RESTART, SLOW, FaultRunner, plan, running
from tests.chaos.stack import PrivateStack
from tests.chaos.support import say, until_done_or_stalled
from tests.e2e.tcp_proxy import TcpProxy
from tests.identity.conftest import TestApp, create_test_app
from tests.identity.import_support import csv_bytes, options, standard, upload

pytestmark = pytest.mark.timeout(SIZE.timeout)

IMPORT_ROWS = 25
#: How many rows of each kind a client writes per acknowledged import (one import per this
#: many user writes).
IMPORT_EVERY = 10
_DONE = (import_pb2.ImportJob.STATE_SUCCEEDED, import_pb2.ImportJob.STATE_FAILED)
#: Errors a client sees while identity or its database is down: not acknowledged, retried.
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
}


class Writers:
    """Clients that retry each write until acknowledged, logging what was acknowledged."""

    def __init__(self, cluster: Cluster, app: TestApp, total: int) -> None:
        self._cluster = cluster
        self._app = app
        self.total = total
        self.users: dict[str, str] = {}  # external id -> first name written
        self.subscriptions: dict[str, str] = {}  # token -> owner's external id
        self.events: dict[str, str] = {}  # event id -> owner's external id
        self.imports: dict[str, list[str]] = {}  # job id -> external ids in its file
        self.refused: list[str] = []  # a clear error where none was due

    def acknowledged(self) -> int:
        return len(self.users) + len(self.subscriptions) + len(self.events)

    async def _call(self, what: str, call: object) -> object:
        """Retry ``call(stub)`` through outages until it answers; a real client does so with
        the same keys (external id, token, event id)."""
        deadline = time.monotonic() + SIZE.timeout
        while True:
            member = self._cluster.members["identity"]
            try:
                async with grpc.aio.insecure_channel(member.target) as channel:
                    stub = identity_service_pb2_grpc.IdentityServiceStub(channel)
                    return await call(stub)  # type: ignore[operator]
            except grpc.aio.AioRpcError as error:
                if error.code() not in _TRANSIENT:
                    self.refused.append(f"{what}: {error.code().name} {error.details()}")
                    return None
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.2)

    async def run(self, client: int, count: int) -> None:
        server = self._app.server
        for i in range(count):
            external_id = f"w{client}-{i}"
            name = f"n{client}-{i}"
            ref = user_ref_pb2.UserRef(external_id=external_id)
            done = await self._call(
                f"user {external_id}",
                lambda s, ref=ref, name=name: s.UpsertUser(
                    ipb.UpsertUserRequest(ref=ref, user=user_pb2.User(first_name=name)),
                    metadata=server,
                    timeout=10,
                ),
            )
            if done is not None:
                self.users[external_id] = name
            token = f"{external_id}@chaos.example"
            done = await self._call(
                f"subscription {token}",
                lambda s, ref=ref, token=token: s.CreateSubscription(
                    ipb.CreateSubscriptionRequest(
                        subscription=spb.Subscription(
                            type=spb.SUBSCRIPTION_TYPE_EMAIL,
                            token=token,
                            opt_in=spb.OPT_IN_STATE_SUBSCRIBED,
                        ),
                        user=ref,
                    ),
                    metadata=server,
                    timeout=10,
                ),
            )
            if done is not None:
                self.subscriptions[token] = external_id
            event_id = f"ev-{external_id}"
            tracked = await self._call(
                f"event {event_id}",
                lambda s, ref=ref, event_id=event_id: s.TrackEvents(
                    ipb.TrackEventsRequest(
                        events=[ipb.TrackedEventInput(user=ref, name="chaos", event_id=event_id)]
                    ),
                    metadata=server,
                    timeout=10,
                ),
            )
            if tracked is not None:
                [result] = tracked.results  # type: ignore[attr-defined]
                if result.HasField("error"):
                    self.refused.append(f"event {event_id}: {result.error.message}")
                else:
                    self.events[event_id] = external_id
            if i % IMPORT_EVERY == 0:
                await self._import(client, i)

    async def _import(self, client: int, i: int) -> None:
        rows = [f"imp{client}-{i}-{r}" for r in range(IMPORT_ROWS)]
        data = csv_bytes([["id", "first_name"], *([row, "imported"] for row in rows)])
        job = await self._call(
            f"import {client}-{i}",
            lambda s: upload(s, self._app, options(standard("first_name")), data, chunk=4096),
        )
        if job is not None:
            self.imports[job.import_id] = rows  # type: ignore[attr-defined]


async def _stored(dsn: str, app_id: str) -> dict[str, dict[str, list[object]]]:
    conn = await asyncpg.connect(dsn)
    try:
        users = await conn.fetch(
            "SELECT external_id, first_name FROM users WHERE app_id = $1", app_id
        )
        subs = await conn.fetch(
            "SELECT s.token, u.external_id FROM subscriptions s JOIN users u "
            "ON u.app_id = s.app_id AND u.user_id = s.user_id WHERE s.app_id = $1",
            app_id,
        )
        events = await conn.fetch(
            "SELECT e.event_id, u.external_id FROM events e JOIN users u "
            "ON u.app_id = e.app_id AND u.user_id = e.user_id WHERE e.app_id = $1",
            app_id,
        )
    finally:
        await conn.close()
    out: dict[str, dict[str, list[object]]] = {
        "users": defaultdict(list),
        "subscriptions": defaultdict(list),
        "events": defaultdict(list),
    }
    for row in users:
        out["users"][row["external_id"]].append(row["first_name"])
    for row in subs:
        out["subscriptions"][row["token"]].append(row["external_id"])
    for row in events:
        out["events"][row["event_id"]].append(row["external_id"])
    return out


async def test_acknowledged_identity_writes_survive_crashes_once(
    stack: PrivateStack, cluster: Cluster
) -> None:
    clients = 3
    per_client = SIZE.writes
    rng = scenario_rng("identity-writes")
    database = await stack.postgres.create_database()
    async with TcpProxy("127.0.0.1", stack.postgres.port) as proxy:
        identity = await cluster.start(
            "identity", "identity", proxy.rewrite_dsn(database), {"TIDINGS_LOG_LEVEL": "WARNING"}
        )
        async with grpc.aio.insecure_channel(identity.target) as channel:
            app = await create_test_app(apps_service_pb2_grpc.AppsServiceStub(channel))
        writers = Writers(cluster, app, clients * per_client * 3)
        verdict = new_verdict("3 identity writes (crashes)", writers.total)
        faults = plan(
            rng,
            kill_targets=("identity",),
            kill_count=SIZE.identity_kills,
            postgres=1,
            cuts=("postgres",),
            slows=("postgres",),
            span=(0.1, 0.8),
        )
        assert {f.kind for f in faults} >= {PG_RESTART, CUT, SLOW}

        async def progress() -> float:
            return writers.acknowledged() / writers.total

        runner = FaultRunner(cluster, faults, progress, proxies={"postgres": proxy})
        async with running(runner, within=SIZE.timeout):
            await asyncio.gather(*(writers.run(c, per_client) for c in range(clients)))
        say(
            f"identity writes: {writers.acknowledged()} acknowledged, "
            f"imports {len(writers.imports)}"
        )

        # Imports answered before a crash finish after it; events reach the table through
        # identity's consumer.
        async def jobs_done() -> bool:
            for import_id in writers.imports:
                job = await writers._call(
                    f"job {import_id}",
                    lambda s, i=import_id: s.GetImportJob(
                        import_pb2.GetImportJobRequest(import_id=i),
                        metadata=app.server,
                        timeout=10,
                    ),
                )
                if job is None or job.state not in _DONE:  # type: ignore[attr-defined]
                    return False
            return True

        async def events_in() -> bool:
            stored = await _stored(database, app.app_id)
            return all(stored["events"].get(e) for e in writers.events)

        async def stored_events() -> float:
            stored = await _stored(database, app.app_id)
            return len(stored["events"]) / max(1, len(writers.events))

        await until_done_or_stalled(jobs_done, stored_events, stall=90, within=SIZE.timeout)
        await until_done_or_stalled(events_in, stored_events, stall=60, within=SIZE.timeout)
        stored = await _stored(database, app.app_id)
    imported = {row: "imported" for rows in writers.imports.values() for row in rows}
    check_rows(
        verdict,
        {f"user {k}": v for k, v in writers.users.items()},
        {f"user {k}": v for k, v in stored["users"].items()},
    )
    check_rows(
        verdict,
        {f"imported {k}": v for k, v in imported.items()},
        {f"imported {k}": v for k, v in stored["users"].items()},
    )
    check_rows(
        verdict,
        {f"subscription {k}": v for k, v in writers.subscriptions.items()},
        {f"subscription {k}": v for k, v in stored["subscriptions"].items()},
    )
    check_rows(
        verdict,
        {f"event {k}": v for k, v in writers.events.items()},
        {f"event {k}": v for k, v in stored["events"].items()},
    )
    verdict.other.extend(writers.refused)
    verdict.operations = writers.acknowledged() + len(imported)
    verdict.notes.update(faults=runner.describe(), imports=len(writers.imports))
    assert runner.fired == len(faults)
    assert verdict.passed, verdict.explain()
