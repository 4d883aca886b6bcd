"""What several scenarios do: users in identity, delivery workers, a webhook channel, a
broadcast and waiting for it, polling with a deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, TypeVar

import asyncpg
import grpc
import grpc.aio
from tidings.delivery.v1 import (
    broadcast_pb2,
    channel_pb2,
    delivery_service_pb2_grpc,
    message_pb2,
)
from tidings.delivery.v1 import delivery_service_pb2 as dpb
from tidings.identity.v1 import identity_service_pb2 as ipb
from tidings.identity.v1 import identity_service_pb2_grpc, user_pb2, user_ref_pb2

from tests.chaos.checker import Verdict
from tests.chaos.cluster import Cluster, Member
from tests.delivery.support import delivery_env, inline, struct, webhook
from tests.identity.conftest import TestApp

T = TypeVar("T")

#: Settings of the suite's delivery members: fast retries, and a send whose worker died
#: mid-call is settled (OUTCOME_UNKNOWN) within seconds instead of minutes.
DELIVERY_SETTINGS = {
    "TIDINGS_STUCK_AFTER_SECONDS": "8",
    "TIDINGS_RETRY_BASE_SECONDS": "0.2",
    "TIDINGS_RETRY_MAX_SECONDS": "2",
    "TIDINGS_SCHEDULER_INTERVAL_SECONDS": "0.3",
    "TIDINGS_LOG_LEVEL": "WARNING",
}
#: The webhook body of every suite message: the user and the step, for the checker.
BODY = '{"u": "{{ user.user_id }}", "n": "{{ data.node | default: \'broadcast\' }}"}'


_T0 = time.monotonic()


def say(text: str) -> None:
    """A progress line (seen with ``pytest -s`` and in ``make chaos``)."""
    print(f"[chaos {time.monotonic() - _T0:7.1f}s] {text}", flush=True)


async def until(
    check: Callable[[], Awaitable[T]], *, within: float, what: str, every: float = 0.25
) -> T:
    """Poll ``check`` until it returns something truthy; raise with its last answer."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last  # type: ignore[no-any-return]
        await asyncio.sleep(every)
    raise TimeoutError(f"{what} not reached within {within:.0f}s; last: {last!r}")


async def until_done_or_stalled(
    done: Callable[[], Awaitable[bool]],
    progress: Callable[[], Awaitable[float]],
    *,
    stall: float,
    within: float,
) -> bool:
    """Wait until ``done``; give up early once ``progress`` has not moved for ``stall`` seconds.

    Returns whether it is done. A scenario checks its logs either way: what never arrived is
    reported as lost, with the seed, instead of a bare timeout.
    """
    deadline = time.monotonic() + within
    last, moved = -1.0, time.monotonic()
    while time.monotonic() < deadline:
        if await done():
            return True
        now_at = await progress()
        if now_at != last:
            last, moved = now_at, time.monotonic()
        elif time.monotonic() - moved > stall:
            say(f"no progress for {stall:.0f}s at {now_at:.1%}: checking what arrived")
            return False
        await asyncio.sleep(1.0)
    return False


async def make_users(identity: Member, app: TestApp, count: int, prefix: str = "c") -> list[str]:
    """``count`` new users (external ids ``<prefix>-<n>``); their ids, in order."""
    async with grpc.aio.insecure_channel(identity.target) as channel:
        stub = identity_service_pb2_grpc.IdentityServiceStub(channel)
        semaphore = asyncio.Semaphore(3)

        async def batch(start: int) -> list[str]:
            requests = [
                ipb.UpsertUserRequest(
                    ref=user_ref_pb2.UserRef(external_id=f"{prefix}-{i}"), user=user_pb2.User()
                )
                for i in range(start, min(start + 1000, count))
            ]
            async with semaphore:
                response = await stub.BatchUpsertUsers(
                    ipb.BatchUpsertUsersRequest(requests=requests),
                    metadata=app.server,
                    timeout=120,
                )
            return [r.user.user_id for r in response.results]

        parts = await asyncio.gather(*(batch(s) for s in range(0, count, 1000)))
    ids = [user_id for part in parts for user_id in part]
    assert len(ids) == count, "identity refused some users"
    assert all(ids), "identity refused some users"
    return ids


async def start_deliveries(
    cluster: Cluster, identity: Member, database_url: str, count: int, **extra: str
) -> list[Member]:
    """``count`` delivery processes sharing one database (a worker group)."""
    members = []
    for _ in range(count):
        label = cluster.next_label("delivery")
        env, _ = delivery_env(identity.target, **{**DELIVERY_SETTINGS, **extra})
        members.append(await cluster.start(label, "delivery", database_url, env))
    return members


def delivery_stub(channel: grpc.aio.Channel) -> Any:
    return delivery_service_pb2_grpc.DeliveryServiceStub(channel)


async def call_any(members: list[Member], call: Callable[[Any], Awaitable[T]]) -> T:
    """Call a delivery RPC on the first member that answers (others may be down)."""
    error: Exception | None = None
    for member in members:
        if member.stopped or member.process.process.returncode is not None:
            continue
        async with grpc.aio.insecure_channel(member.target) as channel:
            try:
                return await call(delivery_stub(channel))
            except grpc.aio.AioRpcError as exc:
                error = exc
    raise error or RuntimeError("no delivery member is up")


async def webhook_channel(members: list[Member], app: TestApp, call_timeout: float = 2.0) -> None:
    """The app's webhook channel, loopback allowed, a short call timeout."""
    credentials = {
        "signing_secret": "chaos-signing-secret-0123",
        "allow_loopback": True,
        "timeout_seconds": call_timeout,
    }
    await call_any(
        members,
        lambda stub: stub.UpdateChannelConfig(
            dpb.UpdateChannelConfigRequest(
                channel_config=channel_pb2.ChannelConfig(
                    channel=channel_pb2.CHANNEL_WEBHOOK, credentials=struct(credentials)
                )
            ),
            metadata=app.server,
            timeout=30,
        ),
    )


async def broadcast_all(members: list[Member], app: TestApp, url: str) -> str:
    """A broadcast to every user of the app through the webhook channel; its id."""
    created = await call_any(
        members,
        lambda stub: stub.Broadcast(
            dpb.BroadcastRequest(
                broadcast=broadcast_pb2.Broadcast(
                    audience=broadcast_pb2.Audience(all_users=True),
                    spec=inline(channel_pb2.CHANNEL_WEBHOOK, webhook(url, body=BODY)),
                )
            ),
            metadata=app.server,
            timeout=30,
        ),
    )
    return str(created.broadcast_id)


async def broadcast_settled(
    members: list[Member], app: TestApp, broadcast_id: str, total: int
) -> broadcast_pb2.Broadcast | None:
    """The broadcast once every message is sent or failed (None before)."""
    try:
        found = await call_any(
            members,
            lambda stub: stub.GetBroadcast(
                dpb.GetBroadcastRequest(broadcast_id=broadcast_id),
                metadata=app.server,
                timeout=10,
            ),
        )
    except (grpc.aio.AioRpcError, RuntimeError):
        return None  # every member is down for a moment
    done = found.sent_count + found.failed_count >= total
    say(
        f"broadcast: enqueued {found.enqueued_count} sent {found.sent_count} "
        f"failed {found.failed_count} of {total}"
    )
    return found if done else None


async def ledger_reasons(database_url: str) -> dict[str, int]:
    """Failure reasons in delivery's timeline, counted (OUTCOME_UNKNOWN, ...)."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT reason, count(*) AS n FROM message_events WHERE reason <> '' GROUP BY reason"
        )
    finally:
        await conn.close()
    return {row["reason"]: int(row["n"]) for row in rows}


async def message_states(database_url: str, user_ids: Collection[str]) -> dict[str, str]:
    """How delivery's ledger left each user's messages: ``state/dispatch/reasons``."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT m.user_id, m.state, m.dispatch, "
            "coalesce(string_agg(e.reason, ',') FILTER (WHERE e.reason <> ''), '') AS reasons "
            "FROM messages m LEFT JOIN message_events e "
            "ON e.app_id = m.app_id AND e.message_id = m.message_id "
            "WHERE m.user_id = ANY($1::text[]) GROUP BY m.user_id, m.state, m.dispatch",
            list(user_ids),
        )
    finally:
        await conn.close()
    return {row["user_id"]: f"{row['state']}/{row['dispatch']}/{row['reasons']}" for row in rows}


def lost_users(verdict: Verdict) -> list[str]:
    """The users of a verdict's lost entries (``"<user>: ..."`` or ``"<user>/<node>: ..."``)."""
    return [entry.split(":", 1)[0].split("/", 1)[0] for entry in verdict.lost]


def expect_no_loss_or_duplicate(verdict: Verdict, states: Mapping[str, str]) -> None:
    """Pass a clean verdict; fail anything else, with the ledger state of each lost user's
    message in the notes (``state/dispatch/reasons``, by cause)."""
    counts: dict[str, int] = {}
    for user in lost_users(verdict):
        cause = states.get(user, "no row")
        counts[cause] = counts.get(cause, 0) + 1
    verdict.notes["lost_by_cause"] = counts
    assert verdict.passed, verdict.explain()


async def resent_keys(database_url: str) -> set[str]:
    """Keys delivery sent again after an unknown outcome (timeline OUTCOME_UNKNOWN, DEFERRED):
    the worker died during the call, or its answer was lost, on a resend-safe channel."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT DISTINCT m.idempotency_key FROM messages m JOIN message_events e "
            "ON e.app_id = m.app_id AND e.message_id = m.message_id "
            "WHERE e.reason = 'OUTCOME_UNKNOWN' AND e.status = $1",
            message_pb2.MESSAGE_STATUS_DEFERRED,
        )
    finally:
        await conn.close()
    return {str(row["idempotency_key"]) for row in rows}
