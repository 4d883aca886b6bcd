"""Routes: instant runs that are the same for every customer at one point of a journey.

From a node, a status and the output a waiting customer takes, the run through nodes that
call nothing and choose nothing per customer (a send without a result wait, an exit, a wait
for an event, a retargeting window, a delay of an exact duration) ends at the same node, in
the same state, with the same path steps for every customer. The engine computes such a route
once per point and applies it to a whole group of claimed (or entering) customers with
set-based SQL (see ``instances_store.move_routed`` / ``enter_routed``) instead of stepping
each customer in Python: a timer burst or an activation is mostly large groups at one point.
Anything else (a profile read, a split, a webhook, a result wait, a paused or stopped journey)
goes through the engine's per-customer steps, which a route reproduces exactly: same rows,
same keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from tidings.events.v1.send_request_pb2 import SendRequest
from tidings.journey.v1 import journey_pb2 as jpb

from services.journey.definitions import node_kind
from services.journey.schedule import in_whole_days

__all__ = [
    "MAX_STEPS_PER_CLAIM",
    "Route",
    "RouteSend",
    "RouteStep",
    "idempotency_key_of",
    "route_from",
    "send_request",
    "timeout_output",
]

#: Steps one customer may take in one claim (a guard; Validate refuses instant cycles).
MAX_STEPS_PER_CLAIM = 100


@dataclass(frozen=True, slots=True)
class RouteStep:
    """A path row a route writes, at ``offset`` from the customer's current step."""

    offset: int
    node_id: str
    output: str
    closed: bool


@dataclass(frozen=True, slots=True)
class RouteSend:
    """A send node the route passes, at ``offset`` from the customer's current step."""

    offset: int
    node_id: str
    template_id: str
    channels: tuple[str, ...]


@dataclass(frozen=True, slots=True, eq=False)
class Route:
    """Where an instant run leads: the path rows, the sends, and the customer's new state.

    Compared by identity (routes are cached; groups of customers are keyed by them).
    ``steps`` always starts with the customer's current step closed (offset 0): a route is only
    taken by customers who leave their node. ``wait`` is the time until ``wake_at`` of a
    customer who stops at a wait (``status == "waiting"``); exited customers have none.
    """

    steps: tuple[RouteStep, ...]
    sends: tuple[RouteSend, ...]
    node_id: str
    offset: int
    status: str
    waiting_for: str
    wait: timedelta | None


def _duration(value: Any) -> timedelta:
    return timedelta(seconds=value.seconds, microseconds=value.nanos // 1000)


def timeout_output(node: jpb.Node) -> str:
    """The output a waiting customer takes when their wait times out."""
    kind = node_kind(node)
    if kind == "send":
        return "failed"
    if kind == "wait_for_event":
        return "timeout"
    if kind == "retarget":
        return "reminder"
    return "next"


def route_from(
    nodes: dict[str, jpb.Node], node_id: str, status: str, pending_output: str
) -> Route | None:
    """The route of a customer at ``node_id`` in ``status`` (of an active journey), or None
    when their run needs the engine's per-customer steps."""
    steps: dict[int, RouteStep] = {}
    sends: list[RouteSend] = []
    current = node_id
    for offset in range(MAX_STEPS_PER_CLAIM):
        node = nodes.get(current)
        if node is None:
            return None
        if status == "waiting":
            output = pending_output or timeout_output(node)
        elif status == "active":
            kind = node_kind(node)
            if kind == "send" and not node.send.wait_for_result:
                sends.append(
                    RouteSend(offset, current, node.send.template_id, tuple(node.send.channels))
                )
                output = "next"
            elif kind == "exit":
                output = "(exit)"
            elif kind in ("wait_for_event", "retarget", "delay") and offset > 0:
                if kind == "delay":
                    # Only an exact duration: whole days and local times need the profile's
                    # time zone, an attribute date the profile itself.
                    if node.delay.WhichOneof("kind") != "duration":
                        return None
                    wait = _duration(node.delay.duration)
                    if in_whole_days(wait) or wait <= timedelta(0):
                        return None
                    waiting_for = "timer"
                elif kind == "retarget":
                    waiting_for = f"retarget:{node.retarget.goal_event}"
                    wait = _duration(node.retarget.window)
                elif node.wait_for_event.WhichOneof("awaited") == "event":
                    waiting_for = f"event:{node.wait_for_event.event.name}"
                    wait = _duration(node.wait_for_event.timeout)
                else:
                    return None  # an engagement wait looks for receipts first
                path = tuple(steps.values())
                return Route(path, tuple(sends), current, offset, "waiting", waiting_for, wait)
            else:
                return None
        else:
            return None
        steps[offset] = RouteStep(offset, current, output, True)
        target = node.next.get(output, "") if output and not output.startswith("(") else ""
        if not target:
            return Route(tuple(steps.values()), tuple(sends), current, offset, "exited", "", None)
        current, status, pending_output = target, "active", ""
        steps[offset + 1] = RouteStep(offset + 1, current, "", False)
    return None  # a long instant run: the engine continues it over several claims


def idempotency_key_of(journey: str, user: str, visit: int, node_id: str, seq: int) -> str:
    """The key of a send: ``<journey>/<user>/<visit>/<node>/<step>``."""
    return f"{journey}/{user}/{visit}/{node_id}/{seq}"


def send_request(
    app_id: str,
    journey: str,
    user: str,
    visit: int,
    seq: int,
    send: RouteSend,
    trigger_properties: dict[str, Any],
    occurred_at: Timestamp,
) -> SendRequest:
    """The ``delivery.requests`` record of a send node reached at step ``seq`` (``journey``
    and ``user`` are the ids as text: turning a UUID into text costs more than the rest)."""
    key = idempotency_key_of(journey, user, visit, send.node_id, seq)
    # The key is unique per send and the same on every retry: it is the event id too.
    request = SendRequest(
        event_id=key,
        app_id=app_id,
        user_id=user,
        idempotency_key=key,
        template_id=send.template_id,
        channels=send.channels,
        journey_id=journey,
        journey_node_id=send.node_id,
        occurred_at=occurred_at,
    )
    if trigger_properties:
        request.trigger_properties.update(trigger_properties)
    return request
