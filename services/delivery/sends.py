"""Send: one message per recipient, idempotent by the caller's key, fanned out through Kafka.

The call validates everything it can without identity (refs, spec, templates exist and suit
their channels), then in one transaction creates a ``queued`` message per recipient (or
``deferred`` until ``send_time``, with its DEFERRED ``SEND_AT`` timeline entry and receipt),
puts their fan-out records in the outbox (exactly once on ``delivery.requests``), and stores the
answer under the idempotency key. The same key within 30 days returns that answer (``replayed``)
and sends nothing; the same key with a different request fails with FAILED_PRECONDITION
(``IDEMPOTENCY_KEY_REUSED``).

Partial success: a malformed recipient ref is refused on its own (its result has no message id
and an INVALID_ARGUMENT ``error`` naming ``users[i]…``); the others are sent, and the call
answers OK even when every recipient is refused (the results say why). A bad spec, key or
recipient count still fails the whole call. Recipients are resolved by the workers: an unknown
user fails later, visible on the message (Send does not call identity).

Each recipient's ledger key is ``send:<key>:<message id>`` (``msg:<message id>`` without a
key), so a redelivered record or a retried worker batch never makes a second provider call.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime, timedelta

import asyncpg
from google.protobuf import timestamp_pb2
from google.rpc import status_pb2
from tidings.delivery.v1 import delivery_service_pb2, message_pb2
from tidings.events.v1.send_request_pb2 import SendRequest as FanOutRecord
from tidings.identity.v1 import user_ref_pb2

from services.delivery import channels
from services.delivery.app_settings import ensure_app
from services.delivery.jobs import record_key
from services.delivery.messages_store import NewMessage, insert_missing
from services.delivery.receipts import Fact, record_facts
from services.delivery.templates import load_templates
from services.delivery.validation import check_idempotency_key, check_ref, check_spec
from services.runtime import outbox
from services.runtime.errors import (
    FailedPrecondition,
    FieldViolations,
    InvalidArgument,
    to_status_proto,
)
from services.runtime.kafka import DELIVERY_REQUESTS

__all__ = ["IDEMPOTENCY_WINDOW", "MAX_RECIPIENTS", "check_templates", "send"]

MAX_RECIPIENTS = 100
IDEMPOTENCY_WINDOW = timedelta(days=30)


async def check_templates(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
    app_id: str,
    spec: message_pb2.MessageSpec,
    field: str,
) -> None:
    """Every template option names an existing template (version) whose channel suits it.

    Raises:
        InvalidArgument: Naming each option whose template is missing or does not fit.
    """
    wanted = [(o.template_id, o.template_version) for o in spec.options if o.template_id]
    found = await load_templates(conn, app_id, wanted)
    violations = FieldViolations()
    for i, option in enumerate(spec.options):
        if not option.template_id:
            continue
        template = found.get((option.template_id, option.template_version))
        if template is None:
            violations.add(
                f"{field}.options[{i}].template_id",
                "no such template (or version) in this app",
                reason="TEMPLATE_NOT_FOUND",
            )
            continue
        if option.channel:
            wanted_kind = channels.content_kind_for(channels.channel_name(option.channel) or "")
            have_kind = channels.content_kind_for(channels.channel_name(template.channel) or "")
            if wanted_kind != have_kind:
                violations.add(
                    f"{field}.options[{i}].channel",
                    "the template is for another kind of channel",
                    reason="TEMPLATE_CHANNEL_MISMATCH",
                )
    violations.raise_if_any()


def _validate(request: delivery_service_pb2.SendRequest) -> None:
    violations = FieldViolations()
    if not request.users:
        violations.add("users", "at least one recipient is required", reason="REQUIRED")
    if len(request.users) > MAX_RECIPIENTS:
        violations.add("users", f"at most {MAX_RECIPIENTS} recipients; use Broadcast for more")
    check_spec(violations, "spec", request.spec)
    check_idempotency_key(violations, "idempotency_key", request.idempotency_key)
    violations.raise_if_any()


def _refusal(field: str, ref: user_ref_pb2.UserRef) -> status_pb2.Status | None:
    """Why the recipient ``ref`` (at ``field``) is refused, as its result's error; None if
    it is well-formed."""
    violations = FieldViolations()
    check_ref(violations, field, ref)
    if not violations:
        return None
    names = ", ".join(dict.fromkeys(v.field for v in violations))
    error = InvalidArgument(
        f"invalid recipient: {names}", reason="INVALID_RECIPIENT", field_violations=violations
    )
    status: status_pb2.Status = to_status_proto(error, domain="delivery")
    return status


def _request_hash(request: delivery_service_pb2.SendRequest) -> bytes:
    return hashlib.sha256(request.SerializeToString(deterministic=True)).digest()


async def _replay(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
    app_id: str,
    request: delivery_service_pb2.SendRequest,
    now: datetime,
) -> delivery_service_pb2.SendResponse | None:
    row = await conn.fetchrow(
        """
        SELECT request_hash, response FROM send_calls
        WHERE app_id = $1 AND idempotency_key = $2 AND create_time > $3
        """,
        app_id,
        request.idempotency_key,
        now - IDEMPOTENCY_WINDOW,
    )
    if row is None:
        return None
    if bytes(row["request_hash"]) != _request_hash(request):
        raise FailedPrecondition(
            "this idempotency key was used with a different request in the last 30 days",
            reason="IDEMPOTENCY_KEY_REUSED",
            metadata={"idempotency_key": request.idempotency_key},
        )
    response = delivery_service_pb2.SendResponse.FromString(row["response"])
    response.replayed = True
    return response


def _send_at_fact(row: NewMessage, detail: str, now: datetime) -> Fact:
    return Fact(
        app_id=row.app_id,
        message_id=row.message_id,
        user_id=row.user_id,
        status=message_pb2.MESSAGE_STATUS_DEFERRED,
        time=now,
        reason="SEND_AT",
        detail=detail,
        idempotency_key=row.idempotency_key,
        # Distinct from the worker's later deferrals of dispatch 0 (quiet hours, caps).
        nth="send_at",
    )


async def send(
    pool: asyncpg.Pool, app_id: str, request: delivery_service_pb2.SendRequest, now: datetime
) -> delivery_service_pb2.SendResponse:
    """Accept a Send call (see the module docstring).

    Raises:
        InvalidArgument: Bad refs, spec, key, or templates that do not exist or fit.
        FailedPrecondition: The idempotency key was used with another request.
    """
    _validate(request)
    key = request.idempotency_key
    send_at = (
        request.send_time.ToDatetime(tzinfo=now.tzinfo) if request.HasField("send_time") else None
    )
    deferred = send_at is not None and send_at > now
    expire_at = None
    if request.spec.HasField("ttl"):
        expire_at = now + request.spec.ttl.ToTimedelta()
    async with pool.acquire() as conn, conn.transaction():
        if key:
            # Two concurrent calls with one key: the second waits here, then replays.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"{app_id}/{key}"
            )
            replayed = await _replay(conn, app_id, request, now)
            if replayed is not None:
                return replayed
        await check_templates(conn, app_id, request.spec, "spec")
        await ensure_app(conn, app_id)
        response = delivery_service_pb2.SendResponse()
        rows: list[NewMessage] = []
        records: list[tuple[str, FanOutRecord]] = []
        occurred = timestamp_pb2.Timestamp()
        occurred.FromDatetime(now)
        for i, ref in enumerate(request.users):
            refused = _refusal(f"users[{i}]", ref)
            if refused is not None:
                response.results.add(error=refused)
                continue
            message_id = uuid.uuid4()
            ledger_key = f"send:{key}:{message_id}" if key else f"msg:{message_id}"
            record = FanOutRecord(
                event_id=str(message_id),
                app_id=app_id,
                idempotency_key=ledger_key,
                message_id=str(message_id),
                spec=request.spec,
                occurred_at=occurred,
            )
            if ref.WhichOneof("ref") == "user_id":
                record.user_id = ref.user_id
            else:
                record.user.CopyFrom(ref)
            if expire_at is not None:
                record.expire_time.FromDatetime(expire_at)
            rows.append(
                NewMessage(
                    app_id=app_id,
                    message_id=message_id,
                    idempotency_key=ledger_key,
                    user_id=record.user_id,
                    broadcast_id=None,
                    state="deferred" if deferred else "queued",
                    status=(
                        message_pb2.MESSAGE_STATUS_DEFERRED
                        if deferred
                        else message_pb2.MESSAGE_STATUS_QUEUED
                    ),
                    expire_at=expire_at,
                    due_at=send_at if deferred else None,
                    request=record.SerializeToString() if deferred else None,
                )
            )
            if not deferred:
                records.append((record_key(record), record))
            response.results.add(message_id=str(message_id))
        await insert_missing(conn, rows, now)
        if deferred:
            # Like every other deferral: a timeline entry and a DEFERRED receipt.
            detail = f"waits until {send_at.isoformat() if send_at else ''}"
            await record_facts(conn, [_send_at_fact(row, detail, now) for row in rows])
        await outbox.enqueue_many(conn, DELIVERY_REQUESTS, records)
        if key:
            await conn.execute(
                """
                INSERT INTO send_calls (app_id, idempotency_key, request_hash, response,
                                        create_time)
                VALUES ($1, $2, $3, $4, $5)
                ON CONFLICT (app_id, idempotency_key) DO UPDATE
                SET request_hash = EXCLUDED.request_hash, response = EXCLUDED.response,
                    create_time = EXCLUDED.create_time
                """,
                app_id,
                key,
                _request_hash(request),
                response.SerializeToString(),
                now,
            )
    return response
