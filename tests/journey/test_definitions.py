"""The definition checker finds every problem, each with its node and field path."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from tidings.identity.v1 import segment_pb2, user_pb2
from tidings.journey.v1 import journey_pb2 as jpb

from services.journey import definitions, schedule
from services.journey.split import choose_branch
from tests.journey.support import definition, delay, exit_node, node, seconds, send


def problems(d: jpb.JourneyDefinition, **kw: bool) -> set[tuple[str, str, str]]:
    return {(p.node_id, p.field, p.reason) for p in definitions.check(d, **kw)}


def test_a_sound_journey_has_no_problem() -> None:
    d = definition(send("a", next="wait"), delay("wait", 3600, next="end"), exit_node("end"))
    assert problems(d) == set()


def test_graph_problems_name_node_and_field() -> None:
    d = definition(
        send("a", next="ghost"),  # unknown node
        send("b", template="", channels=()),  # unreachable, dangling, no template/channel
        node("c", branch=jpb.BranchNode()),  # unreachable, no condition, dangling true/false
    )
    found = problems(d)
    assert ("a", "definition.nodes[0].next[next]", "UNKNOWN_NODE") in found
    assert ("b", "definition.nodes[1]", "UNREACHABLE_NODE") in found
    assert ("b", "definition.nodes[1].next[next]", "DANGLING_OUTPUT") in found
    assert ("b", "definition.nodes[1].send.template_id", "MISSING_TEMPLATE") in found
    assert ("b", "definition.nodes[1].send.channels", "MISSING_CHANNEL") in found
    assert ("c", "definition.nodes[2].branch.condition", "BAD_CONDITION") in found
    assert ("c", "definition.nodes[2].next[true]", "DANGLING_OUTPUT") in found


def test_an_update_profile_node_may_wire_a_failure_output_and_nothing_else() -> None:
    tag = jpb.UpdateProfileNode(attributes={"vip": user_pb2.AttributeValue(string_value="yes")})

    def tagging(**wiring: str) -> jpb.JourneyDefinition:
        return definition(node("tag", update_profile=tag, next=wiring), exit_node("end"))

    wired, plain = tagging(next="end", failure="end"), tagging(next="end")
    assert problems(wired) == problems(plain) == set()  # optional: unwired is not dangling
    assert definitions.refusal_output(wired.nodes[0]) == "failure"
    assert definitions.refusal_output(plain.nodes[0]) == "(refused)"
    assert problems(tagging(next="end", oops="end")) == {
        ("tag", "definition.nodes[0].next[oops]", "UNKNOWN_OUTPUT")
    }
    # Only update-profile nodes have it optional: a branch has no failure output at all.
    branch = definition(
        node("b", branch=jpb.BranchNode(), next={"true": "end", "false": "end", "failure": "end"}),
        exit_node("end"),
    )
    assert ("b", "definition.nodes[0].next[failure]", "UNKNOWN_OUTPUT") in problems(branch)


def test_cycle_without_a_wait_is_refused_and_one_with_a_delay_is_not() -> None:
    split = jpb.SplitNode(
        branches=[jpb.SplitBranch(output="x", weight=50), jpb.SplitBranch(output="y", weight=50)]
    )
    spinning = definition(
        send("a", next="s"), node("s", split=split, next={"x": "a", "y": "end"}), exit_node("end")
    )
    assert {(n, r) for n, _, r in problems(spinning)} >= {
        ("a", "CYCLE_WITHOUT_DELAY"),
        ("s", "CYCLE_WITHOUT_DELAY"),
    }
    pacing = definition(
        send("a", next="d"),
        delay("d", 86400, next="s"),
        node("s", split=split, next={"x": "a", "y": "end"}),
        exit_node("end"),
    )
    assert not any(r == "CYCLE_WITHOUT_DELAY" for _, _, r in problems(pacing))


def test_waits_that_may_end_at_once_do_not_break_a_cycle() -> None:
    dated = node(
        "renewal",
        delay=jpb.DelayNode(
            until_date_attribute=jpb.DelayNode.UntilDateAttribute(attribute="attributes.renew_at")
        ),
        next={"next": "a"},
    )
    # A missing or past date goes on at once: the loop would send again and again.
    looping = definition(send("a", next="renewal"), dated)
    assert {(n, r) for n, _, r in problems(looping)} == {
        ("a", "CYCLE_WITHOUT_DELAY"),
        ("renewal", "CYCLE_WITHOUT_DELAY"),
    }
    # An engagement that already came ends its wait at once as well.
    clicked = node(
        "clicked",
        wait_for_event=jpb.WaitForEventNode(
            engagement=jpb.Engagement(send_node_id="a", kind=jpb.Engagement.KIND_CLICKED),
            timeout=seconds(3600),
        ),
        next={"event": "a", "timeout": "end"},
    )
    engaged = definition(send("a", next="clicked"), clicked, exit_node("end"))
    assert ("clicked", "CYCLE_WITHOUT_DELAY") in {(n, r) for n, _, r in problems(engaged)}
    # A local time of day always waits (for the next one).
    at_nine = node(
        "nine",
        delay=jpb.DelayNode(until_local_time=jpb.DelayNode.UntilLocalTime()),
        next={"next": "a"},
    )
    assert problems(definition(send("a", next="nine"), at_nine)) == set()


def test_bad_weights_conditions_webhooks_and_retargeting() -> None:
    d = definition(
        node(
            "s",
            split=jpb.SplitNode(branches=[jpb.SplitBranch(output="only", weight=0)]),
            next={"only": "b"},
        ),
        node(
            "b",
            branch=jpb.BranchNode(
                condition=segment_pb2.Condition(
                    attribute=segment_pb2.AttributeCondition(field="nope")
                )
            ),
            next={"true": "h", "false": "r"},
        ),
        node(
            "h",
            webhook=jpb.WebhookNode(url="http://10.0.0.8/hook"),
            next={"success": "r", "failure": "r"},
        ),
        node(
            "r",
            retarget=jpb.RetargetNode(goal_event="purchase", window=seconds(3600)),
            next={"converted": "end", "reminder": "end"},
        ),
        exit_node("end"),
    )
    found = problems(d)
    assert ("s", "definition.nodes[0].split.branches", "BAD_WEIGHTS") in found
    assert ("s", "definition.nodes[0].split.branches[0].weight", "BAD_WEIGHTS") in found
    assert ("b", "definition.nodes[1].branch.condition.attribute.field", "BAD_CONDITION") in found
    assert (
        "b",
        "definition.nodes[1].branch.condition.attribute.operator",
        "BAD_CONDITION",
    ) in found
    assert ("h", "definition.nodes[2].webhook.url", "WEBHOOK_URL_REFUSED") in found
    assert ("r", "definition.nodes[3].retarget.correlation_property", "BAD_RETARGET") in found
    # Retargeting correlates with the entry event, and this entry is a list.
    assert ("r", "definition.nodes[3].retarget", "BAD_RETARGET") in found
    # Loopback and private addresses are allowed only when the deployment says so (tests).
    assert ("h", "definition.nodes[2].webhook.url", "WEBHOOK_URL_REFUSED") not in problems(
        d, allow_private=True
    )


def test_entry_and_policy_problems() -> None:
    d = jpb.JourneyDefinition(
        start_node_id="nowhere",
        reentry=jpb.ReentryPolicy(mode=jpb.ReentryPolicy.MODE_AFTER_COOLDOWN),
        nodes=[exit_node("end")],
    )
    found = problems(d)
    assert ("", "definition.entry", "MISSING_ENTRY") in found
    assert ("", "definition.start_node_id", "UNKNOWN_NODE") in found
    assert ("", "definition.reentry.cooldown", "BAD_COOLDOWN") in found


def test_split_is_deterministic_and_follows_weights() -> None:
    journey = uuid.uuid4()
    branches = [jpb.SplitBranch(output="a", weight=25), jpb.SplitBranch(output="b", weight=75)]
    users = [uuid.uuid4() for _ in range(4000)]
    first = [choose_branch(journey, "split", u, branches) for u in users]
    assert first == [choose_branch(journey, "split", u, branches) for u in users]
    share = first.count("a") / len(first)
    assert 0.21 < share < 0.29


def test_two_splits_of_one_journey_choose_independently() -> None:
    # A 50/50 split, then another 50/50 split: four quarters, not two halves.
    journey = uuid.uuid4()
    halves = [jpb.SplitBranch(output="a", weight=1), jpb.SplitBranch(output="b", weight=1)]
    paths = [
        (choose_branch(journey, "first", u, halves), choose_branch(journey, "second", u, halves))
        for u in (uuid.uuid4() for _ in range(4000))
    ]
    for path in [("a", "a"), ("a", "b"), ("b", "a"), ("b", "b")]:
        assert 0.21 < paths.count(path) / len(paths) < 0.29, path


def test_whole_day_delays_keep_the_local_wall_time_across_dst() -> None:
    madrid = ZoneInfo("Europe/Madrid")
    # 2026-03-28 09:00 in Madrid (CET); clocks jump forward on the 29th.
    start = datetime(2026, 3, 28, 9, 0, tzinfo=madrid).astimezone(UTC)
    later = schedule.add_delay(start, timedelta(days=1), madrid)
    assert later.astimezone(madrid).replace(tzinfo=None) == datetime(2026, 3, 29, 9, 0)
    assert later - start == timedelta(hours=23)
    # Not whole days: exact.
    assert schedule.add_delay(start, timedelta(hours=30), madrid) - start == timedelta(hours=30)


def test_local_time_in_a_dst_gap_is_taken_past_the_gap() -> None:
    madrid = ZoneInfo("Europe/Madrid")
    now = datetime(2026, 3, 28, 12, 0, tzinfo=madrid).astimezone(UTC)
    # 02:30 does not exist on 2026-03-29 in Madrid: it is 03:30 CEST.
    moment = schedule.next_local_time(now, time(2, 30), set(), madrid)
    assert moment.astimezone(madrid).replace(tzinfo=None) == datetime(2026, 3, 29, 3, 30)
    # Allowed weekdays: the next Monday (2026-03-30) at 09:00.
    monday = schedule.next_local_time(now, time(9, 0), {1}, madrid)
    assert monday.astimezone(madrid).replace(tzinfo=None) == datetime(2026, 3, 30, 9, 0)


def test_february_29_birthdays_are_on_february_28_in_other_years() -> None:
    tokyo = ZoneInfo("Asia/Tokyo")
    now = datetime(2027, 1, 10, tzinfo=UTC)
    due, year = schedule.birthday_entry(now, tokyo, 2, 29, 0, time(9, 0))
    assert year == 2027
    assert due == datetime(2027, 2, 28, 9, 0, tzinfo=tokyo)
    due, year = schedule.birthday_entry(now, tokyo, 2, 29, 0, time(9, 0), after_year=2027)
    assert (year, due) == (2028, datetime(2028, 2, 29, 9, 0, tzinfo=tokyo))
    # Three days before, in the customer's zone.
    due, _ = schedule.birthday_entry(now, tokyo, 1, 20, -3, time(8, 30))
    assert due == datetime(2027, 1, 17, 8, 30, tzinfo=tokyo)


def test_attribute_values_round_trip() -> None:
    assert definitions.attribute_value(user_pb2.AttributeValue(string_value="x")) == "x"
