"""Compare what clients were promised with what the sinks and stores saw.

A message is *delivered* when the sink answered 200 to a call for it. Its idempotency key may
arrive more than once while no caller has seen a 200 for it yet (after a 429, a 503, a hang or
a dropped connection the retry carries the same key, which is what the key is for). A call for
a key after its 200 is a *duplicate* — unless delivery declared that key's earlier call's
outcome unknown (its worker died during it, or its answer was lost) and sent it again with the
same key, which a receiver honouring the key drops (``resent``: counted, not a duplicate). A
second key for the same (user, step) is always a duplicate.

The checker is pure: it takes logs, returns a :class:`Verdict`, and the test asserts on it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from tests.chaos.sinks import OK, Call

__all__ = ["Verdict", "check_deliveries", "check_rows"]

#: How many examples of each problem a verdict keeps for its message.
_EXAMPLES = 5


@dataclass
class Verdict:
    """The outcome of one scenario run."""

    scenario: str
    seed: int
    operations: int
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    #: Problems that are neither a loss nor a duplicate (a wait too short, a step skipped...).
    other: list[str] = field(default_factory=list)
    #: Set once the checker ran: a verdict nobody checked is not a pass.
    checked: bool = False
    #: Numbers worth printing (retries absorbed, faults injected, seconds taken...).
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        problems = self.lost or self.duplicated or self.unexpected or self.other
        return self.checked and not problems

    def row(self) -> dict[str, object]:
        return {
            "scenario": self.scenario,
            "seed": self.seed,
            "operations": self.operations,
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "unexpected": len(self.unexpected),
            "other": len(self.other),
            "verdict": "PASS" if self.passed else ("FAIL" if self.checked else "ERROR"),
            "notes": self.notes,
        }

    def explain(self) -> str:
        """A message for a failed assertion: counts, examples, and how to reproduce."""
        parts = [
            f"scenario {self.scenario} FAILED with seed {self.seed} "
            f"(reproduce: make chaos SEED={self.seed}, or TIDINGS_CHAOS_SEED={self.seed} pytest)",
            f"operations={self.operations} lost={len(self.lost)} "
            f"duplicated={len(self.duplicated)} unexpected={len(self.unexpected)} "
            f"other={len(self.other)} notes={self.notes}",
        ]
        for name in ("lost", "duplicated", "unexpected", "other"):
            items: list[str] = getattr(self, name)
            if items:
                parts.append(f"{name}: {items[:_EXAMPLES]}")
        return "\n".join(parts)


def check_deliveries(
    verdict: Verdict,
    expected: Mapping[str, int],
    calls: Iterable[Call],
    *,
    step_of: str = "node",
    resent: Collection[str] = (),
) -> Verdict:
    """Fill ``verdict`` from sink calls.

    Args:
        verdict: Where to put the findings.
        expected: How many deliveries each step should get: ``"<user>/<node>"`` → count (1 for
            a broadcast or a journey send; an absent step must get none).
        calls: Every call the sink logged.
        step_of: ``"node"`` (a step is user and node) or ``"user"`` (the node is ignored).
        resent: Keys delivery's ledger shows sent again after an unknown outcome (timeline
            OUTCOME_UNKNOWN, DEFERRED): a call for one after its 200 is a replay the receiver
            drops, counted in ``notes["replays"]``.
    """
    ok_keys: dict[str, set[str]] = defaultdict(set)  # step -> keys answered 200
    answered: set[str] = set()  # keys the sink answered 200
    retries = replays = 0
    declared = set(resent)
    for call in sorted(calls, key=lambda c: c.time):
        step = call.user_id if step_of == "user" else f"{call.user_id}/{call.node}"
        if call.key in answered:
            if call.key in declared:
                replays += 1
            else:
                verdict.duplicated.append(f"{step}: key {call.key} called again after its 200")
            continue
        if call.answer != OK:
            retries += 1
            continue
        answered.add(call.key)
        ok_keys[step].add(call.key)
    for step, keys in ok_keys.items():
        want = expected.get(step, 0)
        if want == 0:
            verdict.unexpected.append(f"{step}: {len(keys)} deliveries nobody asked for")
        elif len(keys) > want:
            verdict.duplicated.append(f"{step}: {len(keys)} keys delivered, {want} expected")
    for step, want in expected.items():
        got = len(ok_keys.get(step, ()))
        if got < want:
            verdict.lost.append(f"{step}: {got} of {want} delivered")
    verdict.notes["retried_calls"] = retries
    verdict.notes["replays"] = replays
    verdict.checked = True
    return verdict


def check_rows(
    verdict: Verdict, acknowledged: Mapping[str, object], stored: Mapping[str, Collection[object]]
) -> Verdict:
    """Fill ``verdict`` from acknowledged writes and what the store holds.

    Args:
        acknowledged: Key of each write the client saw succeed → the value it wrote.
        stored: Key → every row the store holds for it (more than one is a duplicate).
    """
    for key, value in acknowledged.items():
        rows = stored.get(key, ())
        if not rows:
            verdict.lost.append(f"{key}: acknowledged, not stored")
        elif len(rows) > 1:
            verdict.duplicated.append(f"{key}: stored {len(rows)} times")
        elif value is not None and value not in rows:
            verdict.other.append(f"{key}: stored {next(iter(rows))!r}, acknowledged {value!r}")
    verdict.checked = True
    return verdict
