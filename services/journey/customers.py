"""Customers of a journey: adding them by refs or CSV, and their state (Get, List, Put, Delete).

AddCustomers and UploadCustomers enter customers into journeys whose entry is a customer list.
Each batch of up to 1,000 is resolved by identity (BatchGetUsers) and entered in one
transaction; the trigger id is ``list:<request_id>`` (``upload:<request_id>`` for a file), so a
retried call or re-uploaded file enters nobody twice. Without a request id every call is a new
trigger.

PutCustomerState moves a customer to a node at once (an operator's action, so re-entry rules do
not apply): a customer inside leaves their node with ``(moved)``; one who is not inside enters
the active version there. DeleteCustomerState takes a customer out (``(removed)``) and forgets
the visit for the re-entry rule, so they may enter again.
"""

from __future__ import annotations

import codecs
import csv
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from tidings.identity.v1 import user_ref_pb2

from services.journey import instances_store, journeys_store
from services.journey.catalog import Catalog
from services.journey.entries import Candidate, Stepper, enter
from services.journey.instances_store import Instance, StepRow
from services.journey.journeys import not_found
from services.journey.peers import PeerRefused, Peers, PeerUnavailable
from services.runtime import paging
from services.runtime.errors import (
    FailedPrecondition,
    FieldViolation,
    FieldViolations,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from services.runtime.streams import confirm_stream_end

__all__ = [
    "UploadResult",
    "add_customers",
    "delete_state",
    "get_state",
    "list_states",
    "put_state",
    "upload_customers",
]

MAX_BATCH = 1000
MAX_REJECTIONS = 1000


def _unavailable(exc: Exception) -> Unavailable:
    return Unavailable(f"identity could not answer: {exc}", reason="IDENTITY_UNAVAILABLE")


async def _list_journey(pool: asyncpg.Pool, app_id: str, journey_id: uuid.UUID) -> None:
    async with pool.acquire() as conn:
        row = await journeys_store.get_journey(conn, app_id, journey_id)
    if row is None:
        raise not_found(journey_id)
    from tidings.journey.v1 import journey_pb2 as jpb

    active = row
    if row.active_version:
        async with pool.acquire() as conn:
            active = (
                await journeys_store.get_journey(conn, app_id, journey_id, row.active_version)
                or row
            )
    kind = jpb.JourneyDefinition.FromString(active.definition).entry.WhichOneof("kind")
    if kind != "customer_list":
        raise FailedPrecondition(
            "customers can be added only to a journey whose entry is a customer list",
            reason="ENTRY_NOT_A_LIST",
        )
    if row.state != "active":
        raise FailedPrecondition(
            f"the journey is {row.state}: customers enter only an active journey",
            reason="JOURNEY_NOT_ACTIVE",
        )


async def add_customers(
    pool: asyncpg.Pool,
    peers: Peers,
    catalog: Catalog,
    app_id: str,
    journey_id: uuid.UUID,
    refs: Sequence[user_ref_pb2.UserRef],
    request_id: str,
    at: datetime,
    stepper: Stepper | None = None,
) -> list[tuple[str, str]]:
    """Enter customers; ``(user_id, outcome)`` per ref (outcome ``ENTERED``, a refusal, or
    ``USER_NOT_FOUND`` / ``INVALID_REF: <message>``)."""
    violations = FieldViolations()
    if not refs:
        violations.add("customers", "name at least one customer", reason="REQUIRED")
    if len(refs) > MAX_BATCH:
        violations.add("customers", f"at most {MAX_BATCH} per call")
    if len(request_id) > 200:
        violations.add("request_id", "at most 200 characters")
    violations.raise_if_any()
    await _list_journey(pool, app_id, journey_id)
    try:
        resolved = await peers.resolve(app_id, list(refs))
    except (PeerUnavailable, PeerRefused) as exc:
        raise _unavailable(exc) from None
    trigger = f"list:{request_id or uuid.uuid4()}"
    return await _enter_resolved(pool, catalog, app_id, journey_id, resolved, trigger, at, stepper)


async def _enter_resolved(
    pool: asyncpg.Pool,
    catalog: Catalog,
    app_id: str,
    journey_id: uuid.UUID,
    resolved: Sequence[Any],
    trigger: str,
    at: datetime,
    stepper: Stepper | None = None,
) -> list[tuple[str, str]]:
    results: list[tuple[str, str]] = []
    candidates: list[Candidate] = []
    positions: list[int] = []
    for result in resolved:
        if hasattr(result, "user_id"):
            positions.append(len(results))
            candidates.append(Candidate(uuid.UUID(result.user_id), trigger))
            results.append((result.user_id, ""))
        else:
            code = int(result.code)
            results.append(
                ("", "USER_NOT_FOUND" if code == 5 else f"INVALID_REF: {result.message}")
            )
    async with pool.acquire() as conn, conn.transaction():
        outcomes = await enter(
            conn, app_id, journey_id, catalog.definition, candidates, at, stepper=stepper
        )
    for position, outcome in zip(positions, outcomes, strict=True):
        results[position] = (results[position][0], outcome)
    return results


@dataclass
class UploadResult:
    """Counts and the first rejections of an upload."""

    rows: int = 0
    entered: int = 0
    rejected: int = 0
    rejections: list[tuple[int, str]] | None = None


def _ref(kind: str, value: str) -> user_ref_pb2.UserRef:
    if kind == "user_id":
        return user_ref_pb2.UserRef(user_id=value)
    if kind.startswith("alias:"):
        return user_ref_pb2.UserRef(
            alias=user_ref_pb2.UserRef.Alias(label=kind.removeprefix("alias:"), value=value)
        )
    return user_ref_pb2.UserRef(external_id=value)


async def upload_customers(
    pool: asyncpg.Pool,
    peers: Peers,
    catalog: Catalog,
    app_id: str,
    journey_id: uuid.UUID,
    id_column: str,
    id_kind: str,
    request_id: str,
    chunks: AsyncIterator[bytes],
    at: datetime,
    stepper: Stepper | None = None,
) -> UploadResult:
    """Enter the customers of a CSV file streamed in chunks (see the module doc)."""
    id_column = id_column or "customerId"
    id_kind = id_kind or "external_id"
    if id_kind not in ("external_id", "user_id") and not (
        id_kind.startswith("alias:") and len(id_kind) > len("alias:")
    ):
        violations = FieldViolations()
        violations.add("options.id_kind", "external_id, user_id or alias:<label>")
        violations.raise_if_any("id_kind is external_id, user_id or alias:<label>")
    await _list_journey(pool, app_id, journey_id)
    trigger = f"upload:{request_id or uuid.uuid4()}"
    result = UploadResult(rejections=[])
    batch: list[tuple[int, str]] = []

    async def flush() -> None:
        if not batch:
            return
        try:
            resolved = await peers.resolve(app_id, [_ref(id_kind, value) for _, value in batch])
        except (PeerUnavailable, PeerRefused) as exc:
            raise _unavailable(exc) from None
        outcomes = await _enter_resolved(
            pool, catalog, app_id, journey_id, resolved, trigger, at, stepper
        )
        for (line, _), (_, outcome) in zip(batch, outcomes, strict=True):
            if outcome == "ENTERED":
                result.entered += 1
            else:
                reject(line, outcome.split(":", 1)[0])
        batch.clear()

    def reject(line: int, reason: str) -> None:
        result.rejected += 1
        assert result.rejections is not None
        if len(result.rejections) < MAX_REJECTIONS:
            result.rejections.append((line, reason))

    column = -1
    line_number = 0
    async for line in _lines(chunks):
        line_number += 1
        cells = next(csv.reader([line]), [])
        if line_number == 1:
            header = [c.strip().lstrip("\ufeff") for c in cells]
            if id_column not in header:
                raise InvalidArgument(
                    f"the file has no column {id_column!r} (header: {header[:20]})",
                    reason="ID_COLUMN_MISSING",
                    field_violations=[
                        FieldViolation(
                            "options.id_column", f"no column {id_column!r} in the file's header"
                        )
                    ],
                )
            column = header.index(id_column)
            continue
        if not line.strip():
            continue
        result.rows += 1
        value = cells[column].strip() if column < len(cells) else ""
        if not value:
            reject(line_number, "INVALID_ID")
            continue
        batch.append((line_number, value))
        if len(batch) >= MAX_BATCH:
            await flush()
    await flush()
    if line_number == 0:
        raise InvalidArgument("the file is empty", reason="EMPTY_FILE")
    return result


async def _lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """Lines of a UTF-8 byte stream split anywhere (quoted newlines are not supported)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    async for chunk in chunks:
        pending += decoder.decode(chunk)
        *complete, pending = pending.split("\n")
        for line in complete:
            yield line.rstrip("\r")
    # The last batch and an unterminated last line are only whole if the client finished.
    await confirm_stream_end()
    pending += decoder.decode(b"", final=True)
    if pending.strip():
        yield pending.rstrip("\r")


# -- state ---------------------------------------------------------------------------------------


async def resolve_user(peers: Peers, app_id: str, ref: user_ref_pb2.UserRef) -> uuid.UUID:
    """The user id a ref names (a user_id ref is taken as is)."""
    kind = ref.WhichOneof("ref")
    if kind is None:
        violations = FieldViolations()
        violations.add("customer", "name the customer", reason="REQUIRED")
        violations.raise_if_any()
    if kind == "user_id":
        try:
            return uuid.UUID(ref.user_id)
        except ValueError:
            violations = FieldViolations()
            violations.add("customer.user_id", "not a user id")
            violations.raise_if_any()
    try:
        (result,) = await peers.resolve(app_id, [ref])
    except (PeerUnavailable, PeerRefused) as exc:
        raise _unavailable(exc) from None
    if not hasattr(result, "user_id"):
        raise NotFound(
            f"no such customer: {getattr(result, 'message', '')}", reason="USER_NOT_FOUND"
        )
    return uuid.UUID(result.user_id)


async def get_state(
    pool: asyncpg.Pool, app_id: str, journey_id: uuid.UUID, user_id: uuid.UUID
) -> tuple[Instance, list[StepRow]]:
    """A customer's row and the path of their current (or last) visit."""
    async with pool.acquire() as conn:
        if await journeys_store.get_journey(conn, app_id, journey_id) is None:
            raise not_found(journey_id)
        inst = await instances_store.get_instance(conn, app_id, journey_id, user_id)
        if inst is None:
            raise NotFound(
                f"customer {user_id} has never been in journey {journey_id}",
                reason="CUSTOMER_STATE_NOT_FOUND",
            )
        path = await instances_store.path_of(conn, app_id, journey_id, user_id, inst.visit)
    return inst, path


async def list_states(
    pool: asyncpg.Pool,
    app_id: str,
    journey_id: uuid.UUID,
    node_id: str,
    size: int,
    token: str,
) -> tuple[list[Instance], str]:
    """A page of customers' states by user id."""
    limit = paging.page_size(size, default=100, maximum=1000)
    list_name = f"customer-states:{journey_id}:{node_id}"
    after = None
    if token:
        position = paging.decode_page_token(list_name, token)
        try:
            after = uuid.UUID(position["u"])
        except (KeyError, ValueError):
            raise paging.bad_page_token() from None
    async with pool.acquire() as conn:
        if await journeys_store.get_journey(conn, app_id, journey_id) is None:
            raise not_found(journey_id)
        rows = await instances_store.list_instances(
            conn, app_id, journey_id, node_id, after, limit + 1
        )
    next_token = ""
    if len(rows) > limit:
        rows = rows[:limit]
        next_token = paging.encode_page_token(list_name, {"u": str(rows[-1].user_id)})
    return rows, next_token


async def put_state(
    pool: asyncpg.Pool,
    catalog: Catalog,
    app_id: str,
    journey_id: uuid.UUID,
    user_id: uuid.UUID,
    node_id: str,
    at: datetime,
) -> None:
    """Move a customer to ``node_id`` now (entering them if they are not inside)."""
    if not node_id:
        violations = FieldViolations()
        violations.add("node_id", "name the node", reason="REQUIRED")
        violations.raise_if_any()
    async with pool.acquire() as conn, conn.transaction():
        journey = await journeys_store.lock_journey(conn, app_id, journey_id)
        if journey is None:
            raise not_found(journey_id)
        if journey.state not in ("active", "paused"):
            raise FailedPrecondition(f"the journey is {journey.state}", reason="JOURNEY_NOT_ACTIVE")
        found = await instances_store.lock_instances(conn, app_id, journey_id, [user_id])
        inst = found.get(user_id)
        version = inst.version if inst is not None and inst.inside else journey.active_version
        definition = await catalog.definition(app_id, journey_id, version)
        if node_id not in {node.node_id for node in definition.nodes}:
            raise NotFound(
                f"version {version} of the journey has no node {node_id!r}",
                reason="NODE_NOT_FOUND",
            )
        paused = journey.state == "paused"
        if inst is not None and inst.inside:
            steps = [_closed(inst, "(moved)", at)]
            inst.seq += 1
        else:
            visit = inst.visit + 1 if inst is not None else 1
            await instances_store.insert_entries(
                conn, app_id, journey_id, [(user_id, f"put:{uuid.uuid4()}", "ENTERED")], at
            )
            await instances_store.insert_entered(
                conn, app_id, journey_id, version, node_id, [(user_id, visit, "put", {})], at
            )
            found = await instances_store.lock_instances(conn, app_id, journey_id, [user_id])
            inst = found[user_id]
            steps = []
        inst.node_id, inst.node_enter_time, inst.status = node_id, at, "active"
        inst.waiting_for, inst.pending_output = "", ""
        inst.wake_at, inst.parked_wake_at = (None, at) if paused else (at, None)
        steps.append(
            StepRow(app_id, journey_id, user_id, inst.visit, inst.seq, node_id, "", at, None)
        )
        await instances_store.save_instances(conn, [inst])
        await instances_store.upsert_steps(conn, steps)


def _closed(inst: Instance, output: str, at: datetime) -> StepRow:
    return StepRow(
        inst.app_id,
        inst.journey_id,
        inst.user_id,
        inst.visit,
        inst.seq,
        inst.node_id,
        output,
        inst.node_enter_time,
        at,
    )


async def delete_state(
    pool: asyncpg.Pool, app_id: str, journey_id: uuid.UUID, user_id: uuid.UUID, at: datetime
) -> None:
    """Take a customer out; the visit no longer counts for re-entry."""
    async with pool.acquire() as conn, conn.transaction():
        if await journeys_store.get_journey(conn, app_id, journey_id) is None:
            raise not_found(journey_id)
        found = await instances_store.lock_instances(conn, app_id, journey_id, [user_id])
        inst = found.get(user_id)
        if inst is None:
            raise NotFound(
                f"customer {user_id} is not in journey {journey_id}",
                reason="CUSTOMER_STATE_NOT_FOUND",
            )
        if inst.inside:
            await instances_store.upsert_steps(conn, [_closed(inst, "(removed)", at)])
            inst.status, inst.exit_time = "exited", at
            inst.wake_at = inst.parked_wake_at = None
            inst.waiting_for, inst.pending_output = "", ""
        inst.counts_for_reentry = False
        await instances_store.save_instances(conn, [inst])
