"""The journey engine: replicas claim due customers in batches and move each through its graph.

One claim is one transaction: ``SELECT ... WHERE wake_at <= now ORDER BY wake_at LIMIT n FOR
UPDATE SKIP LOCKED`` over ``instances`` (customers ready to move, timers and timeouts that came
due), every claimed customer advanced in memory until they wait, leave or need a retry, then
their new state, their path steps and the ``delivery.requests`` records of their sends (to the
outbox) written with one statement each, and committed together. A crash anywhere before the
commit leaves the rows as they were for the next claim; after it, everything is done: each step
runs exactly once per customer visit, and a send's outbox row exists exactly when its step was
taken. Idempotency keys are ``<journey>/<user>/<visit>/<node>/<step>``. Customers whose run is
the same for everyone at their point of the journey (:mod:`services.journey.routes`) are not
stepped one by one: each such group is moved by one set-based statement in the same transaction.

Calls to other services happen inside the claim (profiles for branches, delays and webhooks;
attribute writes): a profile read has no effect; an attribute write and a webhook call are
repeated if the process dies before the commit (both carry what makes a repeat harmless: a
write sets the same values, a webhook the same ``X-Tidings-Idempotency-Key``). A customer whose
call fails for a reason that may pass (a service down, no key) stays where it is and is retried
after :data:`RETRY_DELAY` (logged each time). A call the peer refuses (an undefined or mistyped
attribute, a user's attribute limit, an invalid event read) would be refused again: the
customer leaves the node by its ``failure`` output if it has one (a webhook; an update-profile
node that wires it), otherwise leaves the journey with ``(refused)`` as the step's output.

Customers of a paused journey are parked (their wake time kept aside until Resume); customers
of a stopped or deleted journey are taken out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time as time_module
import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from liquid import Environment
from liquid.exceptions import LiquidError
from prometheus_client import Counter, Histogram
from tidings.events.v1.send_request_pb2 import SendRequest
from tidings.identity.v1 import user_pb2
from tidings.journey.v1 import journey_pb2 as jpb

from services.journey import instances_store, schedule
from services.journey.catalog import Catalog
from services.journey.conditions import ProfileFacts, calendar_date, matches_profile, value_of
from services.journey.definitions import node_kind, refusal_output
from services.journey.entries import Candidate, enter
from services.journey.instances_store import Instance, RouteRows, StepRow
from services.journey.peers import PeerRefused, Peers, PeerUnavailable
from services.journey.routes import (
    MAX_STEPS_PER_CLAIM,
    Route,
    RouteSend,
    route_from,
    send_request,
    timeout_output,
)
from services.journey.settings import JourneySettings
from services.journey.split import choose_branch
from services.journey.webhooks import WebhookCall, call_webhook
from services.runtime.app import Clock
from services.runtime.db import DBConnection
from services.runtime.http_client import HttpClient
from services.runtime.kafka import DELIVERY_REQUESTS
from services.runtime.metrics import Metrics
from services.runtime.outbox import enqueue_many

__all__ = ["BUSY", "RETRY_DELAY", "Engine", "idempotency_key", "journey_states"]

log = logging.getLogger(__name__)

#: How long a customer whose step needs an unavailable service waits before trying again.
RETRY_DELAY = timedelta(seconds=15)
#: :func:`journey_states` of a journey whose row another transaction changes now.
BUSY = "busy"
#: Pause of a claim loop after a failed iteration, doubling up to the maximum while it fails.
FAILURE_BACKOFF_FIRST = 0.5
FAILURE_BACKOFF_MAX = 30.0
#: How often each claim loop looks for due birthday entries.
BIRTHDAY_POLL_SECONDS = 1.0
DEFAULT_RESULT_TIMEOUT = timedelta(hours=1)
DEFAULT_WEBHOOK_TIMEOUT = 10.0
#: Webhook-node calls one engine process has on the wire at once (its connections per endpoint).
WEBHOOK_CALLS_IN_FLIGHT = 64
_LIQUID = Environment()
#: Engagements that satisfy a wait for each kind (a click implies the message was opened).
ENGAGEMENT_STATUSES = {
    jpb.Engagement.KIND_DELIVERED: ("delivered", "opened", "clicked"),
    jpb.Engagement.KIND_OPENED: ("opened", "clicked"),
    jpb.Engagement.KIND_CLICKED: ("clicked",),
}
_ENGAGEMENT_NAMES = {
    jpb.Engagement.KIND_DELIVERED: "delivered",
    jpb.Engagement.KIND_OPENED: "opened",
    jpb.Engagement.KIND_CLICKED: "clicked",
}


@functools.lru_cache(maxsize=64)
def _timestamp(moment: datetime) -> Timestamp:
    # One claim shares one "now"; messages copy it on assignment, so sharing is safe.
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def idempotency_key(inst: Instance) -> str:
    """The key of the send at the customer's current step."""
    return f"{inst.journey_id}/{inst.user_id}/{inst.visit}/{inst.node_id}/{inst.seq}"


#: Journey versions whose derived parts are kept (forgotten all at once beyond it).
_MAX_VERSIONS = 10_000


def _duration(value: Any) -> timedelta:
    return timedelta(seconds=value.seconds, microseconds=value.nanos // 1000)


@dataclass
class Effects:
    """What one claim writes besides the rows of customers stepped one by one."""

    steps: dict[tuple[str, uuid.UUID, uuid.UUID, int, int], StepRow] = field(default_factory=dict)
    sends: list[tuple[str, SendRequest]] = field(default_factory=list)
    #: Customers moved along a route, by (app, journey, route): written set-based.
    routed: dict[tuple[str, uuid.UUID, Route], list[Instance]] = field(default_factory=dict)

    @property
    def step_count(self) -> int:
        """Path rows written (arrivals and departures merged per step)."""
        return len(self.steps) + sum(
            len(route.steps) * len(group) for (_, _, route), group in self.routed.items()
        )

    def step(self, row: StepRow) -> None:
        # One row per step: an arrival and its departure in the same claim become one upsert.
        self.steps[(row.app_id, row.journey_id, row.user_id, row.visit, row.seq)] = row


class ProfileLoader:
    """Profiles for one claim, fetched with one BatchGetUsers per app however many ask."""

    def __init__(self, peers: Peers) -> None:
        self._peers = peers
        self._futures: dict[tuple[str, uuid.UUID], asyncio.Future[user_pb2.User | None]] = {}
        self._pending: dict[str, list[uuid.UUID]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, app_id: str, user_id: uuid.UUID) -> user_pb2.User | None:
        """The customer's profile, or None when identity has no such user."""
        key = (app_id, user_id)
        future = self._futures.get(key)
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._futures[key] = loop.create_future()
            if not self._pending:
                loop.call_soon(self._flush)
            self._pending.setdefault(app_id, []).append(user_id)
        return await asyncio.shield(future)

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        for app_id, user_ids in pending.items():
            task = asyncio.get_running_loop().create_task(self._load(app_id, user_ids))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _load(self, app_id: str, user_ids: list[uuid.UUID]) -> None:
        try:
            found = await self._peers.get_users(app_id, user_ids)
        except Exception as exc:
            for user_id in user_ids:
                future = self._futures.pop((app_id, user_id))
                if not future.done():
                    future.set_exception(exc)
                    future.exception()  # seen: each waiter re-raises its own copy
            return
        for user_id in user_ids:
            future = self._futures[(app_id, user_id)]
            if not future.done():
                future.set_result(found.get(user_id))


#: Node kinds whose run calls another service (identity, an HTTP endpoint, the database).
_CALLING = frozenset({"branch", "delay", "webhook", "update_profile", "wait_for_event"})


def _calls_ahead(nodes: dict[str, jpb.Node]) -> frozenset[str]:
    """The nodes from which a calling node can be reached (themselves included)."""
    before: dict[str, list[str]] = {}
    for node_id, node in nodes.items():
        for target in node.next.values():
            before.setdefault(target, []).append(node_id)
    found = {node_id for node_id, node in nodes.items() if node_kind(node) in _CALLING}
    todo = list(found)
    while todo:
        for earlier in before.get(todo.pop(), ()):
            if earlier not in found:
                found.add(earlier)
                todo.append(earlier)
    return frozenset(found)


@dataclass(frozen=True, slots=True)
class _Version:
    """What the engine derives from a journey version's definition (a version never changes):
    its nodes by id, the routes met so far from its points, the nodes that may reach a calling
    node."""

    nodes: dict[str, jpb.Node]
    routes: dict[tuple[str, str, str], Route | None]
    calls_ahead: frozenset[str]

    @classmethod
    def of(cls, definition: jpb.JourneyDefinition) -> _Version:
        nodes = {node.node_id: node for node in definition.nodes}
        return cls(nodes, {}, _calls_ahead(nodes))


@dataclass(frozen=True, slots=True)
class _Graph:
    """A journey version as one claim sees it: the journey's state, its nodes by id, the
    routes known from its points (``(node, status, pending output)``, kept across claims), and
    the nodes from which a step may reach a calling node."""

    state: str
    nodes: dict[str, jpb.Node]
    routes: dict[tuple[str, str, str], Route | None]
    journey: str
    calls_ahead: frozenset[str]


class _Retry(Exception):
    """The step needs a service that is unavailable now."""


class Engine:
    """Claims due customers and steps them; run :meth:`run` in as many workers as wanted.

    Args:
        settings: Batch size and idle wait.
        pool: The journey database.
        catalog: Journeys and definitions.
        peers: Identity and delivery.
        clock: The engine's clock (see ``TIDINGS_CLOCK_OFFSET_SECONDS``).
        metrics: Where to count steps and timer lag.
    """

    def __init__(
        self,
        settings: JourneySettings,
        pool: Any,
        catalog: Catalog,
        peers: Peers,
        clock: Clock,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._catalog = catalog
        self._peers = peers
        self._clock = clock
        self._steps, self._lag, self._sends = _metrics(metrics)
        self._wake = asyncio.Event()
        self._versions: dict[tuple[str, uuid.UUID, int], _Version] = {}
        # Shared by the workers: a webhook node calling one endpoint for thousands of
        # customers reuses its connections instead of opening (and handshaking) one per call.
        self._webhooks = HttpClient()
        # A claim steps up to a batch of customers at once: without a bound, a thousand of them
        # at one webhook node would open a thousand connections to the app's endpoint.
        self._webhook_slots = asyncio.Semaphore(WEBHOOK_CALLS_IN_FLIGHT)

    def close(self) -> None:
        """Close the webhook client's idle connections (at shutdown)."""
        self._webhooks.close()

    def nudge(self) -> None:
        """New work is due now: wake idle workers of this process."""
        self._wake.set()

    async def run(self) -> None:
        """Claim and step until cancelled.

        A failing iteration (the database away, a deadlock victim, a bug) is logged and the loop
        goes on after a backoff: letting it raise ended this loop alone while its siblings went
        on, and each restart of the workers added more loops."""
        next_birthdays = 0.0
        backoff = FAILURE_BACKOFF_FIRST
        while True:
            try:
                claimed = await self.step_once()
                # Birthday entries are due at a minute's precision: look once a second (or
                # again at once while there are more), not at every claim.
                if time_module.monotonic() >= next_birthdays:
                    birthdays = await self.enter_due_birthdays()
                    claimed += birthdays
                    if not birthdays:
                        next_birthdays = time_module.monotonic() + BIRTHDAY_POLL_SECONDS
            except Exception:
                log.exception("engine claim failed; trying again in %.1fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, FAILURE_BACKOFF_MAX)
                continue
            backoff = FAILURE_BACKOFF_FIRST
            if claimed == 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._settings.engine_idle_wait)

    async def step_once(self) -> int:
        """One claim: step up to a batch of due customers; returns how many were claimed."""
        now = self._clock()
        async with self._pool.acquire() as conn:
            # One round trip when nothing is due (idle loops ask often), not a transaction's three.
            if not await instances_store.any_due(conn, now):
                return 0
            return await self._claim(conn, now)

    async def _claim(self, conn: DBConnection, now: datetime) -> int:
        async with conn.transaction():
            claimed = await instances_store.claim_due(conn, now, self._settings.engine_batch)
            if not claimed:
                return 0
            if self._lag is not None:
                for inst in claimed:
                    if inst.wake_at is not None:
                        self._lag.observe(max(0.0, (now - inst.wake_at).total_seconds()))
            # The journeys' rows after the customers' (the claim found the customers first), so
            # never waiting for them: Pause/Stop/PutCustomerState lock the journey and then its
            # customers, and a claim waiting here for the journey while holding customers they
            # wait for would deadlock. Customers of a journey being changed now are left as they
            # were (still due) for a claim after that change commits.
            states = await journey_states(
                conn, {(i.app_id, i.journey_id) for i in claimed}, skip_locked=True
            )
            ready = [i for i in claimed if states[(i.app_id, i.journey_id)] != BUSY]
            effects = Effects()
            advanced = await self.step_instances(conn, ready, effects, now, states=states)
            await instances_store.save_instances(conn, advanced)
            for (app_id, journey_id, route), group in effects.routed.items():
                await instances_store.move_routed(
                    conn,
                    app_id,
                    journey_id,
                    [inst.tid for inst in group],
                    _route_rows(route, now),
                    now,
                )
            await instances_store.upsert_steps(conn, list(effects.steps.values()))
            await enqueue_many(conn, DELIVERY_REQUESTS, effects.sends)
        self._count(effects)
        return len(ready)

    async def step_entered(
        self, conn: DBConnection, entered: list[Instance], first_steps: list[StepRow], now: datetime
    ) -> None:
        """Run customers who just entered (in the entry's transaction) until they wait or leave,
        and write them: entering and the first steps are one transition, written once."""
        effects = Effects()
        for step in first_steps:
            effects.step(step)
        journeys = {(i.app_id, i.journey_id) for i in entered}
        advanced = await self.step_instances(
            conn, entered, effects, now, states=dict.fromkeys(journeys, "active")
        )
        if effects.routed:
            # A route writes its customers' first step itself.
            routed = {(i.journey_id, i.user_id) for g in effects.routed.values() for i in g}
            effects.steps = {k: v for k, v in effects.steps.items() if k[1:3] not in routed}
        for (app_id, journey_id, route), group in effects.routed.items():
            await instances_store.enter_routed(
                conn,
                app_id,
                journey_id,
                group[0].version,
                [(i.user_id, i.visit, i.trigger_id, i.trigger_properties) for i in group],
                _route_rows(route, now),
                now,
            )
        await instances_store.upsert_instances(conn, advanced)
        await instances_store.upsert_steps(conn, list(effects.steps.values()))
        await enqueue_many(conn, DELIVERY_REQUESTS, effects.sends)
        self._count(effects)

    def _count(self, effects: Effects) -> None:
        if self._steps is not None:
            self._steps.inc(effects.step_count)
        if self._sends is not None and effects.sends:
            self._sends.inc(len(effects.sends))

    async def step_instances(
        self,
        conn: DBConnection,
        instances: list[Instance],
        effects: Effects,
        now: datetime,
        *,
        states: Mapping[tuple[str, uuid.UUID], str],
    ) -> list[Instance]:
        """Advance locked customers; their new rows (the caller writes them and ``effects``).

        Args:
            conn: The transaction holding the customers' rows.
            instances: The customers.
            effects: Collects path steps and sends.
            now: The engine's time.
            states: The journeys' states (:func:`journey_states`), their rows locked by the
                caller ``FOR SHARE`` so Pause/Resume/Stop wait for this transaction.
        """
        loader = ProfileLoader(self._peers)
        graphs: dict[tuple[str, uuid.UUID, int], _Graph] = {}
        for inst in instances:
            key = (inst.app_id, inst.journey_id, inst.version)
            if key not in graphs:
                version = self._versions.get(key)
                if version is None:
                    if len(self._versions) >= _MAX_VERSIONS:
                        self._versions.clear()
                    version = _Version.of(await self._catalog.definition(*key))
                    if version.nodes:  # a version that is gone is not remembered as empty
                        self._versions[key] = version
                graphs[key] = _Graph(
                    states.get((inst.app_id, inst.journey_id), "gone"),
                    version.nodes,
                    version.routes,
                    str(inst.journey_id),
                    version.calls_ahead,
                )
        # Customers on a route (the bulk of a burst or an activation) are moved together by
        # the caller. Of the others, those who may reach a node that calls another service
        # (a timer firing into a webhook, say) are stepped concurrently: their profile reads
        # share one BatchGetUsers and their calls overlap. The rest go one after the other
        # without a task each.
        advanced: list[Instance] = []
        calling: list[Instance] = []
        routed = effects.routed
        stamp = _timestamp(now)
        for inst in instances:
            graph = graphs[(inst.app_id, inst.journey_id, inst.version)]
            route = self._route(inst, graph) if graph.state == "active" else None
            if route is not None and self._route_sends(inst, graph, route, effects, stamp):
                group = routed.get((inst.app_id, inst.journey_id, route))
                if group is None:
                    group = routed[(inst.app_id, inst.journey_id, route)] = []
                group.append(inst)
                continue
            if inst.node_id in graph.calls_ahead:
                calling.append(inst)
            else:
                advanced.append(await self._advance(inst, graph, effects, loader, now))
        if calling:
            advanced.extend(
                await asyncio.gather(
                    *(
                        self._advance(
                            inst,
                            graphs[(inst.app_id, inst.journey_id, inst.version)],
                            effects,
                            loader,
                            now,
                        )
                        for inst in calling
                    )
                )
            )
        return advanced

    def _route_sends(
        self, inst: Instance, graph: _Graph, route: Route, effects: Effects, stamp: Timestamp
    ) -> bool:
        """Add the send requests of a customer's route; False (nothing added) when one cannot
        be built, so the customer goes one by one (and waits for a retry there)."""
        if not route.sends:
            return True
        user = str(inst.user_id)
        try:
            requests = [
                send_request(
                    inst.app_id,
                    graph.journey,
                    user,
                    inst.visit,
                    inst.seq + send.offset,
                    send,
                    inst.trigger_properties,
                    stamp,
                )
                for send in route.sends
            ]
        except Exception:
            return False
        effects.sends.extend((user, request) for request in requests)
        return True

    def _route(self, inst: Instance, graph: _Graph) -> Route | None:
        point = (inst.node_id, inst.status, inst.pending_output)
        try:
            return graph.routes[point]
        except KeyError:
            route = graph.routes[point] = route_from(graph.nodes, *point)
            return route

    # -- one customer ----------------------------------------------------------------------------

    async def _advance(
        self,
        original: Instance,
        graph: _Graph,
        effects: Effects,
        loader: ProfileLoader,
        now: datetime,
    ) -> Instance:
        inst = original.copy()
        if graph.state == "paused":
            inst.parked_wake_at, inst.wake_at = inst.wake_at or now, None
            return inst
        if graph.state == "gone":
            self._finish(inst, effects, "(stopped)", now)
            return inst
        nodes = graph.nodes
        try:
            for _ in range(MAX_STEPS_PER_CLAIM):
                node = nodes.get(inst.node_id)
                if node is None:
                    self._finish(inst, effects, "(removed)", now)
                    return inst
                if inst.status == "waiting":
                    self._leave(
                        inst, node, inst.pending_output or timeout_output(node), effects, now
                    )
                elif inst.status == "active":
                    taken = await self._run_node(inst, node, effects, loader, now)
                    if taken is None:
                        return inst  # waits now
                    self._leave(inst, node, taken, effects, now)
                if not inst.inside:
                    return inst
            return inst  # a long instant run: continue at the next claim (still due now)
        except _Retry as retry:
            log.warning(
                "journey %s: customer %s waits at %s: %s",
                inst.journey_id,
                inst.user_id,
                inst.node_id,
                retry,
            )
            inst.status, inst.wake_at = "active", now + RETRY_DELAY
            return inst
        except PeerRefused as refused:
            # Retrying a refusal would hold the customer here for ever: move them on, and say
            # why in their path (and the log, with the peer's reason).
            log.warning(
                "journey %s: customer %s leaves %s: %s",
                inst.journey_id,
                inst.user_id,
                inst.node_id,
                refused,
            )
            refused_at = nodes[inst.node_id]
            self._leave(inst, refused_at, refusal_output(refused_at), effects, now)
            return inst
        except Exception:
            # A bug or bad data must not stall every customer claimed with this one: this
            # customer stays where they were (nothing of this step is written) and is retried.
            log.exception(
                "journey %s: stepping customer %s at %s failed",
                inst.journey_id,
                inst.user_id,
                original.node_id,
            )
            for key in [k for k in effects.steps if k[1:3] == (inst.journey_id, inst.user_id)]:
                del effects.steps[key]
            effects.sends[:] = [
                s
                for s in effects.sends
                if not s[1].idempotency_key.startswith(f"{inst.journey_id}/{inst.user_id}/")
            ]
            again = original.copy()
            again.wake_at = now + RETRY_DELAY
            return again

    def _leave(
        self, inst: Instance, node: jpb.Node, output: str, effects: Effects, now: datetime
    ) -> None:
        """Close the current step with ``output`` and arrive where it leads (or leave)."""
        effects.step(_step(inst, output, now))
        target = node.next.get(output, "") if output and not output.startswith("(") else ""
        if not target:
            inst.status, inst.wake_at, inst.exit_time = "exited", None, now
            inst.waiting_for, inst.pending_output = "", ""
            return
        inst.seq += 1
        inst.node_id, inst.node_enter_time = target, now
        inst.status, inst.wake_at, inst.waiting_for, inst.pending_output = "active", now, "", ""
        effects.step(_step(inst, "", now, open_=True))

    def _finish(self, inst: Instance, effects: Effects, output: str, now: datetime) -> None:
        effects.step(_step(inst, output, now))
        inst.status, inst.wake_at, inst.parked_wake_at, inst.exit_time = "exited", None, None, now
        inst.waiting_for, inst.pending_output = "", ""

    def _wait(self, inst: Instance, waiting_for: str, until: datetime) -> None:
        inst.status, inst.waiting_for, inst.wake_at = "waiting", waiting_for, until

    async def _run_node(
        self,
        inst: Instance,
        node: jpb.Node,
        effects: Effects,
        loader: ProfileLoader,
        now: datetime,
    ) -> str | None:
        """Run the node the customer just reached: the output to take, or None if waiting."""
        kind = node_kind(node)
        if kind == "send":
            effects.sends.append((str(inst.user_id), self._send_request(inst, node, now)))
            if not node.send.wait_for_result:
                return "next"
            timeout = (
                _duration(node.send.result_timeout)
                if node.send.HasField("result_timeout")
                else DEFAULT_RESULT_TIMEOUT
            )
            self._wait(inst, f"result:{idempotency_key(inst)}", now + timeout)
            return None
        if kind == "exit":
            return "(exit)"
        if kind == "split":
            return choose_branch(inst.journey_id, inst.node_id, inst.user_id, node.split.branches)
        if kind == "wait_for_event":
            return await self._wait_for_event(inst, node.wait_for_event, now)
        if kind == "retarget":
            retarget = node.retarget
            self._wait(inst, f"retarget:{retarget.goal_event}", now + _duration(retarget.window))
            return None
        if kind == "delay":
            return await self._delay(inst, node.delay, loader, now)
        if kind == "branch":
            user = await self._profile(inst, loader)
            if user is None:
                return "false"
            held = await self._guard(
                matches_profile(node.branch.condition, user, now, self._facts(inst))
            )
            return "true" if held else "false"
        if kind == "webhook":
            return await self._webhook(inst, node, loader)
        if kind == "update_profile":
            await self._guard(
                self._peers.set_attributes(
                    inst.app_id, inst.user_id, node.update_profile.attributes
                )
            )
            return "next"
        return "(exit)"

    async def _guard(self, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except PeerUnavailable as exc:
            raise _Retry(str(exc)) from None

    async def _profile(self, inst: Instance, loader: ProfileLoader) -> user_pb2.User | None:
        return await self._guard(loader.get(inst.app_id, inst.user_id))  # type: ignore[no-any-return]

    def _facts(self, inst: Instance) -> ProfileFacts:
        async def events(name: str, start: datetime | None, end: datetime | None) -> list[Any]:
            return await self._peers.events(inst.app_id, inst.user_id, name, start, end)

        async def is_member(segment_id: str) -> bool:
            try:
                return await self._peers.is_member(inst.app_id, segment_id, inst.user_id)
            except PeerRefused:
                return False

        async def default_zone() -> str:
            return await self._peers.default_zone(inst.app_id)

        return ProfileFacts(events=events, is_member=is_member, default_zone=default_zone)

    def _send_request(self, inst: Instance, node: jpb.Node, now: datetime) -> SendRequest:
        send = RouteSend(0, inst.node_id, node.send.template_id, tuple(node.send.channels))
        return send_request(
            inst.app_id,
            str(inst.journey_id),
            str(inst.user_id),
            inst.visit,
            inst.seq,
            send,
            inst.trigger_properties,
            _timestamp(now),
        )

    async def _wait_for_event(
        self, inst: Instance, wait: jpb.WaitForEventNode, now: datetime
    ) -> str | None:
        until = now + _duration(wait.timeout)
        if wait.WhichOneof("awaited") == "event":
            self._wait(inst, f"event:{wait.event.name}", until)
            return None
        engagement = wait.engagement
        # The engagement may have come already (a fast click): look before waiting. A receipt
        # committed after this look finds the customer waiting (the consumer locks the row).
        async with self._pool.acquire() as conn:
            found = await conn.fetchval(
                """
                SELECT 1 FROM send_receipts
                WHERE journey_id = $1 AND user_id = $2 AND app_id = $3 AND node_id = $4
                  AND idempotency_key LIKE $5 AND status = ANY($6::text[])
                LIMIT 1
                """,
                inst.journey_id,
                inst.user_id,
                inst.app_id,
                engagement.send_node_id,
                f"{inst.journey_id}/{inst.user_id}/{inst.visit}/%",
                list(ENGAGEMENT_STATUSES[engagement.kind]),
            )
        if found:
            return "event"
        name = _ENGAGEMENT_NAMES[engagement.kind]
        self._wait(inst, f"engagement:{engagement.send_node_id}:{name}", until)
        return None

    async def _delay(
        self, inst: Instance, delay: jpb.DelayNode, loader: ProfileLoader, now: datetime
    ) -> str | None:
        kind = delay.WhichOneof("kind")
        user = await self._profile(inst, loader)
        zone = schedule.zone_of(await self._guard(self._peers.zone_for(inst.app_id, user)))
        if kind == "duration":
            until = schedule.add_delay(now, _duration(delay.duration), zone)
        elif kind == "until_local_time":
            local = delay.until_local_time
            until = schedule.next_local_time(
                now, time(local.time.hours, local.time.minutes), set(local.days), zone
            )
        else:
            name = delay.until_date_attribute.attribute.removeprefix("attributes.")
            value = (
                value_of(user.attributes[name])
                if user is not None and name in user.attributes
                else None
            )
            if isinstance(value, str) and (day := calendar_date(value)) is not None:
                # A date field: the day starts at the customer's local midnight.
                value = datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)
            if not isinstance(value, datetime):
                return "next"
            until = value + _duration(delay.until_date_attribute.offset)
        if until <= now:
            return "next"
        self._wait(inst, "timer", until)
        return None

    async def _webhook(self, inst: Instance, node: jpb.Node, loader: ProfileLoader) -> str:
        hook = node.webhook
        user = await self._profile(inst, loader)
        context = {
            "user": _template_user(user),
            "event": inst.trigger_properties,
            "journey": {"id": str(inst.journey_id), "node_id": inst.node_id},
        }
        try:
            call = WebhookCall(
                method=(hook.method or "POST").upper(),
                url=_LIQUID.from_string(hook.url).render(**context),
                body=_LIQUID.from_string(hook.body).render(**context),
                headers={
                    name: _LIQUID.from_string(value).render(**context)
                    for name, value in hook.headers.items()
                },
                timeout=(
                    _duration(hook.timeout).total_seconds()
                    if hook.HasField("timeout")
                    else DEFAULT_WEBHOOK_TIMEOUT
                ),
                secret=hook.secret,
                idempotency_key=idempotency_key(inst),
            )
        except LiquidError as exc:
            log.warning("webhook %s of journey %s: %s", inst.node_id, inst.journey_id, exc)
            return "failure"
        async with self._webhook_slots:
            result = await call_webhook(
                self._webhooks, call, allow_private=self._settings.webhook_allow_private
            )
        if not result.success:
            log.info(
                "webhook %s of journey %s failed: %s %s",
                inst.node_id,
                inst.journey_id,
                result.status,
                result.detail,
            )
        return "success" if result.success else "failure"

    # -- birthdays ------------------------------------------------------------------------------

    async def enter_due_birthdays(self) -> int:
        """Enter customers whose birthday entry came due; schedule their next year."""
        now = self._clock()
        async with self._pool.acquire() as conn, conn.transaction():
            due = await conn.fetch(
                """
                SELECT app_id, journey_id, user_id, trigger_id, birth_month, birth_day, timezone
                FROM entry_timers WHERE due_at <= $1
                ORDER BY due_at LIMIT $2
                FOR UPDATE SKIP LOCKED
                """,
                now,
                self._settings.engine_batch,
            )
            if not due:
                return 0
            by_journey: dict[tuple[str, uuid.UUID], list[Any]] = {}
            for row in due:
                by_journey.setdefault((row["app_id"], row["journey_id"]), []).append(row)
            # Holding timers Stop deletes: never wait for a journey's row (see journey_states).
            states = await journey_states(conn, set(by_journey), skip_locked=True)
            updates: list[tuple[str, uuid.UUID, uuid.UUID, datetime, str]] = []
            handled = 0
            for (app_id, journey_id), rows in by_journey.items():
                if states[(app_id, journey_id)] == BUSY:
                    continue  # the timers stay due for a look after that change
                live = (await self._catalog.live()).get((app_id, journey_id))
                definition = live.definition if live is not None else None
                if definition is None or definition.entry.WhichOneof("kind") != "birthday":
                    handled += len(rows)
                    continue
                try:
                    # Customers without a zone of their own have the app's next year too.
                    default = (
                        await self._peers.default_zone(app_id)
                        if any(not r["timezone"] for r in rows)
                        else ""
                    )
                except PeerUnavailable as exc:
                    log.warning("birthdays of journey %s wait: %s", journey_id, exc)
                    continue  # still due: looked at again on the next poll
                handled += len(rows)
                await enter(
                    conn,
                    app_id,
                    journey_id,
                    self._catalog.definition,
                    [Candidate(r["user_id"], r["trigger_id"]) for r in rows],
                    now,
                    stepper=self.step_entered,
                )
                birthday = definition.entry.birthday
                at = _entry_time(birthday)
                for r in rows:
                    year = int(r["trigger_id"].split(":", 1)[1])
                    next_due, next_year = schedule.birthday_entry(
                        now,
                        schedule.zone_of(r["timezone"] or default),
                        r["birth_month"],
                        r["birth_day"],
                        birthday.days_offset,
                        at,
                        after_year=year,
                    )
                    updates.append(
                        (app_id, journey_id, r["user_id"], next_due, f"birthday:{next_year}")
                    )
            await conn.execute(
                """
                UPDATE entry_timers t SET due_at = u.due_at, trigger_id = u.trigger_id
                FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::timestamptz[], $5::text[])
                     AS u(app_id, journey_id, user_id, due_at, trigger_id)
                WHERE t.app_id = u.app_id AND t.journey_id = u.journey_id
                  AND t.user_id = u.user_id
                """,
                *(list(column) for column in zip(*updates, strict=True))
                if updates
                else ([], [], [], [], []),
            )
        self.nudge()
        return handled


async def journey_states(
    conn: DBConnection, journeys: set[tuple[str, uuid.UUID]], *, skip_locked: bool = False
) -> dict[tuple[str, uuid.UUID], str]:
    """The state of each journey (``active``, ``paused``, ``gone``), read ``FOR SHARE`` so
    lifecycle changes wait for the caller's transaction.

    Lock order is the journey's row before its customers' rows. A caller already holding
    customers' rows passes ``skip_locked``: a journey whose row another transaction holds (a
    Pause, a Stop, a PutCustomerState, that may be waiting for those customers) is then
    :data:`BUSY` instead of waited for.
    """
    wanted = sorted(journeys)
    apps, ids = [j[0] for j in wanted], [j[1] for j in wanted]
    records = await conn.fetch(
        f"""
        SELECT app_id, journey_id, state FROM journeys
        WHERE (app_id, journey_id) IN (SELECT * FROM unnest($1::text[], $2::uuid[]))
        ORDER BY app_id, journey_id
        FOR SHARE{" SKIP LOCKED" if skip_locked else ""}
        """,
        apps,
        ids,
    )
    states = dict.fromkeys(wanted, "gone")
    for r in records:
        state = r["state"]
        states[(r["app_id"], r["journey_id"])] = state if state in ("active", "paused") else "gone"
    if skip_locked and len(records) < len(wanted):
        # Skipped (locked) or deleted: only a row that still exists is busy.
        read = {(r["app_id"], r["journey_id"]) for r in records}
        for r in await conn.fetch(
            """
            SELECT app_id, journey_id FROM journeys
            WHERE (app_id, journey_id) IN (SELECT * FROM unnest($1::text[], $2::uuid[]))
            """,
            apps,
            ids,
        ):
            if (key := (r["app_id"], r["journey_id"])) not in read:
                states[key] = BUSY
    return states


def _entry_time(birthday: jpb.Entry.Birthday) -> time:
    if birthday.HasField("local_time"):
        return time(birthday.local_time.hours, birthday.local_time.minutes)
    return time(9, 0)


def _route_rows(route: Route, now: datetime) -> RouteRows:
    return RouteRows(
        route.node_id,
        route.status,
        route.waiting_for,
        now + route.wait if route.wait is not None else None,
        route.offset,
        [(step.offset, step.node_id, step.output, step.closed) for step in route.steps],
    )


def _step(inst: Instance, output: str, now: datetime, *, open_: bool = False) -> StepRow:
    return StepRow(
        inst.app_id,
        inst.journey_id,
        inst.user_id,
        inst.visit,
        inst.seq,
        inst.node_id,
        output,
        inst.node_enter_time,
        None if open_ else now,
    )


def _template_user(user: user_pb2.User | None) -> dict[str, Any]:
    if user is None:
        return {}
    fields = (
        "user_id",
        "external_id",
        "first_name",
        "last_name",
        "email",
        "phone",
        "timezone",
        "language",
        "country",
    )
    result: dict[str, Any] = {name: getattr(user, name) for name in fields}
    result["attributes"] = {
        name: (v.isoformat() if isinstance(v := value_of(value), datetime) else v)
        for name, value in user.attributes.items()
    }
    return result


_METRICS: dict[int, tuple[Counter, Histogram, Counter]] = {}


def _metrics(metrics: Metrics | None) -> tuple[Counter | None, Histogram | None, Counter | None]:
    if metrics is None:
        return None, None, None
    key = id(metrics)
    if key not in _METRICS:
        _METRICS[key] = (
            Counter(
                "journey_steps_total",
                "Path steps written by the engine (arrivals and departures).",
                registry=metrics.registry,
            ),
            Histogram(
                "journey_wake_lag_seconds",
                "How late claimed customers were stepped after their wake time.",
                buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
                registry=metrics.registry,
            ),
            Counter(
                "journey_sends_total",
                "Send requests written to the outbox by the engine.",
                registry=metrics.registry,
            ),
        )
    return _METRICS[key]
