"""Entering customers into a journey: idempotency, re-entry, concurrency and schedule rules.

Every way in (AddCustomers, a CSV upload, the activation audience, a segment fact, a custom
event, a birthday) comes down to :func:`enter`, inside the caller's transaction:

1. the journey row is locked ``FOR SHARE`` and must be active: Pause/Stop wait for entries in
   flight and vice versa. A concurrency limit is counted under a transaction-scoped advisory
   lock of the journey as well, so entries into it count one after the other. (Upgrading the
   row lock to ``FOR UPDATE`` instead deadlocked: two entries holding ``FOR SHARE`` each waited
   for the other to let go.) Lock order, everywhere: the journey row before its customers'
   rows;
2. a (customer, trigger) pair seen before changes nothing (``DUPLICATE_TRIGGER``), unless it
   was refused for a passing reason (``OUTSIDE_SCHEDULE``, ``CONCURRENCY_LIMIT``): that
   trigger may enter once the schedule is open or the journey has room, and its ``entries``
   row takes the latest outcome;
3. a customer inside is refused (``ALREADY_INSIDE``); one who left is refused by the re-entry
   rule (``REENTRY_REFUSED``: once, or within the cooldown since the last entry); entries past
   the limit of customers inside are refused (``CONCURRENCY_LIMIT``), and so is every entry
   outside the entry schedule (``OUTSIDE_SCHEDULE``);
4. every attempt is recorded in ``entries`` (the refusals are statistics), and those who entered
   stand at the start node, due now, with the first step of their path.

A journey that is not active (paused, stopped) records nothing: ``JOURNEY_NOT_ACTIVE`` refuses
the journey, not the customer, so it never uses up a trigger (after Resume the same trigger
enters). Its callers rarely get that far: AddCustomers refuses the whole call first, facts are
not offered to a paused journey, and an audience waits for Resume.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from tidings.journey.v1 import journey_pb2 as jpb

from services.journey import instances_store
from services.journey.instances_store import Instance, StepRow
from services.runtime.db import DBConnection

__all__ = ["ENTERED", "Candidate", "Stepper", "enter"]

ENTERED = "ENTERED"


class Stepper(Protocol):
    """Runs customers who just entered until they wait or leave, and writes them: their rows,
    all path steps, and the sends to request (the engine's ``step_entered``)."""

    async def __call__(
        self, conn: DBConnection, entered: list[Instance], first_steps: list[StepRow], now: datetime
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class Candidate:
    """Someone who may enter, and what triggered it."""

    user_id: uuid.UUID
    trigger_id: str
    properties: dict[str, Any] = field(default_factory=dict)


def _cooldown(definition: jpb.JourneyDefinition) -> timedelta:
    c = definition.reentry.cooldown
    return timedelta(seconds=c.seconds, microseconds=c.nanos // 1000)


def _outside_schedule(definition: jpb.JourneyDefinition, at: datetime) -> bool:
    nanos = int(at.timestamp() * 1e9)
    if (
        definition.HasField("entry_start_time")
        and nanos < definition.entry_start_time.ToNanoseconds()
    ):
        return True
    return (
        definition.HasField("entry_end_time") and nanos >= definition.entry_end_time.ToNanoseconds()
    )


async def enter(
    conn: DBConnection,
    app_id: str,
    journey_id: uuid.UUID,
    definitions: Any,
    candidates: Sequence[Candidate],
    at: datetime,
    *,
    stepper: Stepper | None = None,
) -> list[str]:
    """Enter ``candidates`` into the journey's active version; an outcome per candidate.

    Args:
        conn: A connection inside the caller's transaction.
        app_id: The app.
        journey_id: The journey.
        definitions: ``async (app_id, journey_id, version) -> JourneyDefinition`` (a cache).
        candidates: Who, with which trigger; a user listed twice enters at most once.
        at: Now (the engine's clock).
        stepper: Runs the entered customers' first steps in this transaction and writes them
            (the engine); without it they wait at the start node, due now, for a claim.

    Returns:
        ``ENTERED`` or the refusal reason, in the order of ``candidates``.
    """
    if not candidates:
        return []
    row = await conn.fetchrow(
        "SELECT state, active_version FROM journeys WHERE app_id = $1 AND journey_id = $2"
        " FOR SHARE",
        app_id,
        journey_id,
    )
    if row is None or row["state"] != "active":
        # Not recorded: a paused journey's refusal must not use up the trigger (see above).
        return ["JOURNEY_NOT_ACTIVE"] * len(candidates)
    version = int(row["active_version"])
    definition: jpb.JourneyDefinition = await definitions(app_id, journey_id, version)
    limit = definition.max_concurrent_customers
    if _outside_schedule(definition, at):
        refused = ["OUTSIDE_SCHEDULE"] * len(candidates)
        await instances_store.insert_entries(
            conn, app_id, journey_id, _unique_rows(candidates, refused), at
        )
        return refused
    if limit > 0:
        # Counting needs the entries of other transactions to be in: serialise them, with a
        # lock only entries take (Pause/Stop already exclude us through the row's FOR SHARE).
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('tidings.journey.entries:' || $1, 0))",
            str(journey_id),
        )
    # A trigger already recorded is refused by the entries insert below (ON CONFLICT); only a
    # concurrency limit needs to know it before deciding, so a repeat takes no slot.
    seen: set[tuple[uuid.UUID, str]] = set()
    if limit > 0:
        pairs = [(c.user_id, c.trigger_id) for c in candidates]
        seen = await instances_store.seen_triggers(conn, app_id, journey_id, pairs)
    existing = await instances_store.lock_instances(
        conn, app_id, journey_id, list({c.user_id for c in candidates})
    )
    inside = await instances_store.count_inside(conn, app_id, journey_id) if limit > 0 else 0
    mode = definition.reentry.mode
    cooldown = _cooldown(definition)
    outcomes: list[str] = []
    taken: set[uuid.UUID] = set()
    for candidate in candidates:
        before = existing.get(candidate.user_id)
        if (candidate.user_id, candidate.trigger_id) in seen:
            outcome = "DUPLICATE_TRIGGER"
        elif candidate.user_id in taken or (before is not None and before.inside):
            outcome = "ALREADY_INSIDE"
        elif (
            before is not None
            and before.counts_for_reentry
            and (
                mode in (jpb.ReentryPolicy.MODE_UNSPECIFIED, jpb.ReentryPolicy.MODE_ONCE)
                or (
                    mode == jpb.ReentryPolicy.MODE_AFTER_COOLDOWN
                    and at - before.enter_time < cooldown
                )
            )
        ):
            outcome = "REENTRY_REFUSED"
        elif limit > 0 and inside >= limit:
            outcome = "CONCURRENCY_LIMIT"
        else:
            outcome = ENTERED
            inside += 1
            taken.add(candidate.user_id)
        outcomes.append(outcome)
    inserted = await instances_store.insert_entries(
        conn, app_id, journey_id, _unique_rows(candidates, outcomes), at
    )
    start = definition.start_node_id
    entered: list[Instance] = []
    for index, candidate in enumerate(candidates):
        if (candidate.user_id, candidate.trigger_id) not in inserted:
            # Recorded before (or by a concurrent twin): whatever this attempt would have been.
            outcomes[index] = "DUPLICATE_TRIGGER"
            continue
        if outcomes[index] != ENTERED:
            continue
        before = existing.get(candidate.user_id)
        entered.append(
            Instance(
                app_id,
                journey_id,
                candidate.user_id,
                before.visit + 1 if before is not None else 1,
                version,
                start,
                "active",
                "",
                at,
                None,
                "",
                1,
                at,
                at,
                None,
                candidate.trigger_id,
                candidate.properties,
                True,
            )
        )
    if not entered:
        return outcomes
    steps = [
        StepRow(app_id, journey_id, i.user_id, i.visit, 1, start, "", at, None) for i in entered
    ]
    if stepper is not None:
        await stepper(conn, entered, steps, at)
    else:
        await instances_store.upsert_instances(conn, entered)
        await instances_store.upsert_steps(conn, steps)
    return outcomes


def _unique_rows(
    candidates: Sequence[Candidate], outcomes: Sequence[str]
) -> list[tuple[uuid.UUID, str, str]]:
    rows: dict[tuple[uuid.UUID, str], str] = {}
    for candidate, outcome in zip(candidates, outcomes, strict=True):
        if outcome == "DUPLICATE_TRIGGER":
            continue
        key = (candidate.user_id, candidate.trigger_id)
        # An ENTERED twin wins over its refused repeats within one call.
        if key not in rows or outcome == ENTERED:
            rows[key] = outcome
    return [(user, trigger, outcome) for (user, trigger), outcome in rows.items()]
