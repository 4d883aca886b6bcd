"""The journey definition language: outputs of each node kind, and validation.

:func:`check` is pure: it walks a ``JourneyDefinition`` and returns every problem it finds,
each naming the node and the field path (``definition.nodes[2].send.template_id``), so a
designer fixes them all in one round. What needs another service (does the segment exist, does
the template) is asked by :mod:`services.journey.journeys` and appended to the same list.

Graph rules:

* every node is reachable from ``start_node_id`` (``UNREACHABLE_NODE``);
* every output of a node is wired (``DANGLING_OUTPUT``; an exit node has none), to a node that
  exists (``UNKNOWN_NODE``), and only outputs the kind has are wired (``UNKNOWN_OUTPUT``); an
  optional output (an update-profile node's ``failure``) may stay unwired;
* every cycle passes a node that always waits (a delay of a duration or until a local time of
  day, a wait for an event, retargeting, a send waiting for its result): a cycle of instant
  nodes would spin forever (``CYCLE_WITHOUT_DELAY``). A delay until a date attribute goes on at
  once when the date is missing or past, and a wait for an engagement at once when it already
  came: they do not break a cycle.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

from liquid import Environment
from liquid.exceptions import LiquidError
from tidings.identity.v1 import segment_pb2, subscription_pb2, user_pb2
from tidings.journey.v1 import journey_pb2 as jpb

from services.journey.webhooks import WebhookRefused, check_literal_url

__all__ = [
    "CHANNELS",
    "NODE_ID_PATTERN",
    "Problem",
    "check",
    "condition_segment_ids",
    "node_kind",
    "optional_outputs_of",
    "outputs_of",
    "refusal_output",
    "waits",
]

#: Node ids: short, URL- and key-safe.
NODE_ID_PATTERN = re.compile(r"[a-z0-9_-]{1,40}")
#: Delivery channels a send may name.
CHANNELS = frozenset(
    {"ios_push", "android_push", "web_push", "email", "sms", "whatsapp", "telegram", "webhook"}
)
MAX_NODES = 500
MIN_DELAY = timedelta(minutes=1)
MAX_DELAY = timedelta(days=3653)
MAX_WAIT = timedelta(days=3653)
MAX_WEBHOOK_TIMEOUT = timedelta(seconds=30)
_WEBHOOK_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
_ATTRIBUTE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_STANDARD_FIELDS = frozenset(
    {
        "first_name",
        "last_name",
        "email",
        "phone",
        "birthdate",
        "timezone",
        "language",
        "country",
        "external_id",
        "create_time",
        "update_time",
    }
)
_NO_OPERAND = frozenset({segment_pb2.OPERATOR_EXISTS, segment_pb2.OPERATOR_NOT_EXISTS})
_DAYS_OPERATORS = frozenset(
    {
        segment_pb2.OPERATOR_WITHIN_LAST_DAYS,
        segment_pb2.OPERATOR_WITHIN_NEXT_DAYS,
        segment_pb2.OPERATOR_ANNIVERSARY_IN_DAYS,
    }
)
_LIQUID = Environment()


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem of a definition (becomes a ``JourneyProblem``)."""

    node_id: str
    field: str
    reason: str
    message: str


def node_kind(node: jpb.Node) -> str:
    """The node's kind (``send``, ``branch``, ...), or ``""`` when none is set."""
    return node.WhichOneof("kind") or ""


def outputs_of(node: jpb.Node) -> list[str]:
    """The outputs a node has, by kind: each must be wired (see :func:`optional_outputs_of`)."""
    kind = node_kind(node)
    if kind == "send":
        return ["delivered", "failed"] if node.send.wait_for_result else ["next"]
    if kind == "branch":
        return ["true", "false"]
    if kind == "wait_for_event":
        return ["event", "timeout"]
    if kind == "split":
        return [branch.output for branch in node.split.branches]
    if kind == "retarget":
        return ["converted", "reminder"]
    if kind in ("delay", "update_profile"):
        return ["next"]
    if kind == "webhook":
        return ["success", "failure"]
    return []


def optional_outputs_of(node: jpb.Node) -> list[str]:
    """The outputs a node may wire but need not: unwired, the case ends the visit there."""
    # An update-profile node's write refused by identity: without ``failure`` the customer
    # leaves with ``(refused)``.
    return ["failure"] if node_kind(node) == "update_profile" else []


def refusal_output(node: jpb.Node) -> str:
    """The output taken when a peer refuses the node's call for good: ``failure`` where the node
    has one (a webhook; an update-profile node that wires it), else ``(refused)`` (leave)."""
    if "failure" in outputs_of(node) or (
        "failure" in optional_outputs_of(node) and "failure" in node.next
    ):
        return "failure"
    return "(refused)"


def waits(node: jpb.Node) -> bool:
    """Whether a customer at this node always waits for time or a fact before leaving it."""
    kind = node_kind(node)
    if kind == "delay":
        return node.delay.WhichOneof("kind") in ("duration", "until_local_time")
    if kind == "wait_for_event":
        return node.wait_for_event.WhichOneof("awaited") == "event"
    return kind == "retarget" or (kind == "send" and node.send.wait_for_result)


def _duration(value: object) -> timedelta:
    seconds = getattr(value, "seconds", 0)
    nanos = getattr(value, "nanos", 0)
    return timedelta(seconds=seconds, microseconds=nanos // 1000)


class _Checker:
    def __init__(self, definition: jpb.JourneyDefinition, *, allow_private: bool) -> None:
        self.d = definition
        self.allow_private = allow_private
        self.problems: list[Problem] = []
        self.index: dict[str, int] = {}

    def add(self, node_id: str, field: str, reason: str, message: str) -> None:
        self.problems.append(Problem(node_id, field, reason, message))

    # -- journey-wide --------------------------------------------------------------------------

    def run(self) -> list[Problem]:
        self.entry()
        self.policy()
        self.goal()
        if len(self.d.nodes) > MAX_NODES:
            self.add("", "definition.nodes", "TOO_MANY_NODES", f"at most {MAX_NODES} nodes")
        for i, node in enumerate(self.d.nodes):
            path = f"definition.nodes[{i}]"
            if not NODE_ID_PATTERN.fullmatch(node.node_id):
                self.add(
                    node.node_id,
                    f"{path}.node_id",
                    "BAD_NODE_ID",
                    "node ids are 1-40 characters of a-z, 0-9, _ and -",
                )
            elif node.node_id in self.index:
                self.add(node.node_id, f"{path}.node_id", "DUPLICATE_NODE", "node id used twice")
            else:
                self.index[node.node_id] = i
        if not self.d.start_node_id:
            self.add("", "definition.start_node_id", "MISSING_START", "name the first node")
        elif self.d.start_node_id not in self.index:
            self.add(
                "",
                "definition.start_node_id",
                "UNKNOWN_NODE",
                f"no node {self.d.start_node_id!r}",
            )
        for i, node in enumerate(self.d.nodes):
            self.node(i, node)
        self.graph()
        return self.problems

    def entry(self) -> None:
        entry = self.d.entry
        kind = entry.WhichOneof("kind")
        if kind is None:
            self.add("", "definition.entry", "MISSING_ENTRY", "choose who enters the journey")
        elif kind == "segment" and not entry.segment.segment_id:
            self.add("", "definition.entry.segment.segment_id", "UNKNOWN_SEGMENT", "required")
        elif kind == "event":
            if not entry.event.name:
                self.add("", "definition.entry.event.name", "MISSING_EVENT", "required")
            self.properties(entry.event.where, "", "definition.entry.event.where")
        elif kind == "birthday":
            if not -365 <= entry.birthday.days_offset <= 365:
                self.add(
                    "",
                    "definition.entry.birthday.days_offset",
                    "BAD_OFFSET",
                    "between -365 and 365 days",
                )
            if entry.birthday.HasField("local_time"):
                self.time_of_day(entry.birthday.local_time, "", "definition.entry.birthday")

    def policy(self) -> None:
        d = self.d
        if d.reentry.mode == jpb.ReentryPolicy.MODE_AFTER_COOLDOWN and (
            _duration(d.reentry.cooldown) <= timedelta(0)
        ):
            self.add("", "definition.reentry.cooldown", "BAD_COOLDOWN", "set a positive cooldown")
        if d.max_concurrent_customers < 0:
            self.add("", "definition.max_concurrent_customers", "BAD_LIMIT", "must not be negative")
        if (
            d.HasField("entry_start_time")
            and d.HasField("entry_end_time")
            and d.entry_end_time.ToNanoseconds() <= d.entry_start_time.ToNanoseconds()
        ):
            self.add(
                "", "definition.entry_end_time", "BAD_SCHEDULE", "must be after entry_start_time"
            )

    def goal(self) -> None:
        if self.d.goal.where and not self.d.goal.event_name:
            self.add("", "definition.goal.event_name", "MISSING_EVENT", "name the goal event")
        self.properties(self.d.goal.where, "", "definition.goal.where")

    # -- nodes -------------------------------------------------------------------------------

    def node(self, i: int, node: jpb.Node) -> None:
        path = f"definition.nodes[{i}]"
        nid = node.node_id
        kind = node_kind(node)
        if not kind:
            self.add(nid, path, "MISSING_KIND", "choose what the node does")
            return
        getattr(self, f"node_{kind}")(node, nid, f"{path}.{kind}")
        outputs = outputs_of(node)
        allowed = outputs + optional_outputs_of(node)
        for output in sorted(node.next):
            target = node.next[output]
            if output not in allowed:
                self.add(
                    nid,
                    f"{path}.next[{output}]",
                    "UNKNOWN_OUTPUT",
                    f"a {kind} node has no output {output!r} (it has: {', '.join(allowed)})"
                    if allowed
                    else f"a {kind} node has no outputs",
                )
            elif target not in self.index:
                self.add(nid, f"{path}.next[{output}]", "UNKNOWN_NODE", f"no node {target!r}")
        for output in outputs:
            if output and output not in node.next:
                self.add(
                    nid,
                    f"{path}.next[{output}]",
                    "DANGLING_OUTPUT",
                    f"output {output!r} leads nowhere: wire it (to an exit node to end there)",
                )

    def node_send(self, node: jpb.Node, nid: str, path: str) -> None:
        send = node.send
        if not send.template_id:
            self.add(nid, f"{path}.template_id", "MISSING_TEMPLATE", "choose a template")
        if not send.channels:
            self.add(nid, f"{path}.channels", "MISSING_CHANNEL", "choose at least one channel")
        for j, channel in enumerate(send.channels):
            if channel not in CHANNELS:
                self.add(
                    nid,
                    f"{path}.channels[{j}]",
                    "MISSING_CHANNEL",
                    f"unknown channel {channel!r} (one of {', '.join(sorted(CHANNELS))})",
                )
        if send.HasField("result_timeout"):
            self.wait_length(send.result_timeout, nid, f"{path}.result_timeout")

    def node_branch(self, node: jpb.Node, nid: str, path: str) -> None:
        if not node.branch.HasField("condition"):
            self.add(nid, f"{path}.condition", "BAD_CONDITION", "set a condition")
            return
        self.condition(node.branch.condition, nid, f"{path}.condition")

    def node_wait_for_event(self, node: jpb.Node, nid: str, path: str) -> None:
        wait = node.wait_for_event
        awaited = wait.WhichOneof("awaited")
        if awaited is None:
            self.add(nid, path, "MISSING_EVENT", "set the event or the engagement to wait for")
        elif awaited == "event":
            if not wait.event.name:
                self.add(nid, f"{path}.event.name", "MISSING_EVENT", "required")
            self.properties(wait.event.where, nid, f"{path}.event.where")
        else:
            engagement = wait.engagement
            target = (
                self.d.nodes[self.index[engagement.send_node_id]]
                if (engagement.send_node_id in self.index)
                else None
            )
            if target is None or node_kind(target) != "send":
                self.add(
                    nid,
                    f"{path}.engagement.send_node_id",
                    "UNKNOWN_NODE",
                    f"no send node {engagement.send_node_id!r}",
                )
            if engagement.kind == jpb.Engagement.KIND_UNSPECIFIED:
                self.add(nid, f"{path}.engagement.kind", "MISSING_EVENT", "choose the engagement")
        if not wait.HasField("timeout"):
            self.add(nid, f"{path}.timeout", "BAD_TIMEOUT", "set how long to wait")
        else:
            self.wait_length(wait.timeout, nid, f"{path}.timeout")

    def node_split(self, node: jpb.Node, nid: str, path: str) -> None:
        branches = node.split.branches
        if not 2 <= len(branches) <= 20:
            self.add(nid, f"{path}.branches", "BAD_WEIGHTS", "a split has 2 to 20 branches")
        names: set[str] = set()
        for j, branch in enumerate(branches):
            if not 1 <= branch.weight <= 100:
                self.add(nid, f"{path}.branches[{j}].weight", "BAD_WEIGHTS", "weights are 1 to 100")
            if not branch.output or not NODE_ID_PATTERN.fullmatch(branch.output):
                self.add(
                    nid,
                    f"{path}.branches[{j}].output",
                    "BAD_WEIGHTS",
                    "name the output (1-40 characters of a-z, 0-9, _ and -)",
                )
            elif branch.output in names:
                self.add(nid, f"{path}.branches[{j}].output", "BAD_WEIGHTS", "output named twice")
            names.add(branch.output)

    def node_retarget(self, node: jpb.Node, nid: str, path: str) -> None:
        retarget = node.retarget
        if not retarget.goal_event:
            self.add(nid, f"{path}.goal_event", "MISSING_EVENT", "required")
        if not retarget.correlation_property:
            self.add(nid, f"{path}.correlation_property", "BAD_RETARGET", "required")
        if self.d.entry.WhichOneof("kind") != "event":
            self.add(
                nid,
                path,
                "BAD_RETARGET",
                "retargeting correlates with the entry event: the entry must be a custom event",
            )
        if not retarget.HasField("window"):
            self.add(nid, f"{path}.window", "BAD_TIMEOUT", "set how long to wait")
        else:
            self.wait_length(retarget.window, nid, f"{path}.window")

    def node_delay(self, node: jpb.Node, nid: str, path: str) -> None:
        delay = node.delay
        kind = delay.WhichOneof("kind")
        if kind is None:
            self.add(nid, path, "BAD_DELAY", "set a duration, a local time or a date attribute")
        elif kind == "duration":
            length = _duration(delay.duration)
            if not MIN_DELAY <= length <= MAX_DELAY:
                self.add(nid, f"{path}.duration", "BAD_DELAY", "from one minute to ten years")
        elif kind == "until_local_time":
            self.time_of_day(delay.until_local_time.time, nid, f"{path}.until_local_time")
            for j, day in enumerate(delay.until_local_time.days):
                if not 1 <= day <= 7:
                    self.add(
                        nid,
                        f"{path}.until_local_time.days[{j}]",
                        "BAD_DELAY",
                        "a day of the week (MONDAY..SUNDAY)",
                    )
        else:
            name = delay.until_date_attribute.attribute
            bare = name.removeprefix("attributes.")
            if not _ATTRIBUTE_NAME.fullmatch(bare):
                self.add(
                    nid,
                    f"{path}.until_date_attribute.attribute",
                    "BAD_DELAY",
                    "name a timestamp custom attribute (`attributes.renewal_at`)",
                )

    def node_webhook(self, node: jpb.Node, nid: str, path: str) -> None:
        hook = node.webhook
        if hook.method and hook.method.upper() not in _WEBHOOK_METHODS:
            self.add(nid, f"{path}.method", "BAD_WEBHOOK", "GET, POST, PUT, PATCH or DELETE")
        if not hook.url:
            self.add(nid, f"{path}.url", "WEBHOOK_URL_REFUSED", "required")
        for field_name, text in (("url", hook.url), ("body", hook.body)):
            self.template(text, nid, f"{path}.{field_name}")
        for name, value in hook.headers.items():
            self.template(value, nid, f"{path}.headers[{name}]")
        if hook.url and "{" not in hook.url:
            try:
                check_literal_url(hook.url, allow_private=self.allow_private)
            except WebhookRefused as exc:
                self.add(nid, f"{path}.url", "WEBHOOK_URL_REFUSED", str(exc))
        if hook.HasField("timeout") and not (
            timedelta(0) < _duration(hook.timeout) <= MAX_WEBHOOK_TIMEOUT
        ):
            self.add(nid, f"{path}.timeout", "BAD_WEBHOOK", "more than 0 and at most 30 seconds")

    def node_update_profile(self, node: jpb.Node, nid: str, path: str) -> None:
        if not node.update_profile.attributes:
            self.add(nid, f"{path}.attributes", "BAD_UPDATE", "set at least one attribute")
        for name, value in node.update_profile.attributes.items():
            if not _ATTRIBUTE_NAME.fullmatch(name):
                self.add(nid, f"{path}.attributes[{name}]", "BAD_UPDATE", "not an attribute name")
            elif value.WhichOneof("kind") is None:
                self.add(nid, f"{path}.attributes[{name}]", "BAD_UPDATE", "set a value")

    def node_exit(self, node: jpb.Node, nid: str, path: str) -> None:
        pass

    # -- pieces --------------------------------------------------------------------------------

    def template(self, text: str, nid: str, path: str) -> None:
        try:
            _LIQUID.from_string(text)
        except LiquidError as exc:
            self.add(nid, path, "BAD_TEMPLATE", f"not a valid Liquid template: {exc}")

    def wait_length(self, value: object, nid: str, path: str) -> None:
        if not timedelta(0) < _duration(value) <= MAX_WAIT:
            self.add(nid, path, "BAD_TIMEOUT", "more than 0 and at most ten years")

    def time_of_day(self, value: object, nid: str, path: str) -> None:
        hours, minutes = getattr(value, "hours", 0), getattr(value, "minutes", 0)
        if not (0 <= hours <= 23 and 0 <= minutes <= 59):
            self.add(nid, path, "BAD_TIME", "a time of day 00:00-23:59")

    def properties(
        self, conditions: Iterable[segment_pb2.PropertyCondition], nid: str, path: str
    ) -> None:
        for j, condition in enumerate(conditions):
            self.property_condition(condition, nid, f"{path}[{j}]")

    def property_condition(
        self, condition: segment_pb2.PropertyCondition, nid: str, path: str
    ) -> None:
        if not condition.property:
            self.add(nid, f"{path}.property", "BAD_CONDITION", "name the property")
        self.operator(condition.operator, len(condition.values), nid, path, property_only=True)

    def operator(
        self, operator: int, values: int, nid: str, path: str, *, property_only: bool = False
    ) -> None:
        if operator == segment_pb2.OPERATOR_UNSPECIFIED:
            self.add(nid, f"{path}.operator", "BAD_CONDITION", "choose an operator")
            return
        if property_only and operator in _DAYS_OPERATORS:
            self.add(nid, f"{path}.operator", "BAD_CONDITION", "not available on event properties")
            return
        if operator in _DAYS_OPERATORS or operator in _NO_OPERAND:
            return
        if operator == segment_pb2.OPERATOR_BETWEEN:
            wanted_ok = values == 2
        elif operator in (segment_pb2.OPERATOR_IN, segment_pb2.OPERATOR_NOT_IN):
            wanted_ok = values >= 1
        else:
            wanted_ok = values == 1
        if not wanted_ok:
            self.add(nid, f"{path}.values", "BAD_CONDITION", "wrong number of values")

    def condition(
        self, condition: segment_pb2.Condition, nid: str, path: str, depth: int = 0
    ) -> None:
        if depth > 10:
            self.add(nid, path, "BAD_CONDITION", "conditions nest at most 10 levels")
            return
        kind = condition.WhichOneof("kind")
        if kind is None:
            self.add(nid, path, "BAD_CONDITION", "an empty condition")
        elif kind in ("all", "any"):
            children = getattr(condition, kind).conditions
            if not children:
                self.add(nid, f"{path}.{kind}", "BAD_CONDITION", "at least one condition")
            for j, child in enumerate(children):
                self.condition(child, nid, f"{path}.{kind}.conditions[{j}]", depth + 1)
        elif kind == "not":
            self.condition(condition.__getattribute__("not"), nid, f"{path}.not", depth + 1)
        elif kind == "attribute":
            attr = condition.attribute
            name = attr.field
            if name not in _STANDARD_FIELDS and not (
                name.startswith("attributes.")
                and _ATTRIBUTE_NAME.fullmatch(name.removeprefix("attributes."))
            ):
                self.add(
                    nid,
                    f"{path}.attribute.field",
                    "BAD_CONDITION",
                    f"unknown field {name!r} (a standard field or `attributes.<name>`)",
                )
            self.operator(attr.operator, len(attr.values), nid, f"{path}.attribute")
        elif kind == "event":
            if not condition.event.name:
                self.add(nid, f"{path}.event.name", "BAD_CONDITION", "name the event")
            self.properties(condition.event.where, nid, f"{path}.event.where")
        elif kind == "subscription":
            if condition.subscription.type == subscription_pb2.SUBSCRIPTION_TYPE_UNSPECIFIED:
                self.add(nid, f"{path}.subscription.type", "BAD_CONDITION", "choose a type")
        elif kind == "member_of" and not condition.member_of.segment_id:
            self.add(nid, f"{path}.member_of.segment_id", "UNKNOWN_SEGMENT", "required")

    # -- graph ---------------------------------------------------------------------------------

    def edges(self) -> dict[str, list[str]]:
        return {
            node.node_id: [t for t in node.next.values() if t in self.index]
            for node in self.d.nodes
            if node.node_id in self.index
        }

    def graph(self) -> None:
        edges = self.edges()
        start = self.d.start_node_id
        seen: set[str] = set()
        if start in edges:
            stack = [start]
            while stack:
                current = stack.pop()
                if current in seen:
                    continue
                seen.add(current)
                stack.extend(edges[current])
        for node_id, i in self.index.items():
            if node_id not in seen:
                self.add(
                    node_id,
                    f"definition.nodes[{i}]",
                    "UNREACHABLE_NODE",
                    "no path from the start node leads here",
                )
        instant = {
            nid: [t for t in targets if not waits(self.d.nodes[self.index[t]])]
            for nid, targets in edges.items()
            if not waits(self.d.nodes[self.index[nid]])
        }
        for component in _cycles(instant):
            for nid in sorted(component):
                self.add(
                    nid,
                    f"definition.nodes[{self.index[nid]}]",
                    "CYCLE_WITHOUT_DELAY",
                    "this node is on a cycle with no delay or wait: customers would loop "
                    f"forever ({' -> '.join(sorted(component))})",
                )


def _cycles(edges: dict[str, list[str]]) -> Iterator[set[str]]:
    """Strongly connected components of ``edges`` that contain a cycle (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(edges.get(root, [])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in edges:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges.get(child, []))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges.get(node, []):
                    yield component


def check(definition: jpb.JourneyDefinition, *, allow_private: bool = False) -> list[Problem]:
    """Every problem of ``definition`` that can be found without asking another service."""
    return _Checker(definition, allow_private=allow_private).run()


def condition_segment_ids(condition: segment_pb2.Condition) -> Iterator[tuple[str, str]]:
    """``(path suffix, segment id)`` of every membership condition in a condition tree."""
    kind = condition.WhichOneof("kind")
    if kind in ("all", "any"):
        for j, child in enumerate(getattr(condition, kind).conditions):
            for sub, segment_id in condition_segment_ids(child):
                yield f".{kind}.conditions[{j}]{sub}", segment_id
    elif kind == "not":
        for sub, segment_id in condition_segment_ids(condition.__getattribute__("not")):
            yield f".not{sub}", segment_id
    elif kind == "member_of" and condition.member_of.segment_id:
        yield ".member_of.segment_id", condition.member_of.segment_id


def attribute_value(value: user_pb2.AttributeValue) -> object:
    """A plain Python value of an ``AttributeValue`` (None for null or unset)."""
    kind = value.WhichOneof("kind")
    if kind == "timestamp_value":
        return value.timestamp_value.ToDatetime()
    if kind in (None, "null_value"):
        return None
    return getattr(value, kind)
