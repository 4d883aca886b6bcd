"""Broadcasts: a job that enqueues one fan-out record per user of an audience.

* **All users / a segment / a list**: Broadcast stores the job (``fanning_out``) and answers at
  once; a fan-out task (any replica; one per broadcast, by advisory lock) reads the audience in
  pages of 1,000 (identity's ListUsers, ListSegmentMembers, or the stored list), publishes the
  page's records (acks=all) and then saves its cursor (the page token, the list index, or the
  last segment member's user id: members stream in user id order, so a resume by id is right
  whoever joined or left meanwhile) and the enqueued count. After a crash the next owner resumes
  at the cursor; the page that may have been published twice names the same
  messages (ids and ledger keys are derived from the broadcast and the user), so no one gets a
  second message.
* **CSV** (client stream): the file is parsed as it arrives and enqueued page by page, so a
  1,000,000-row upload holds one page in memory, never the file. The call answers once every
  row is enqueued. The upload holds the broadcast's advisory lock while it runs; an upload that
  broke off (the client went away, the process died: the fan-out task fails a job left
  ``fanning_out`` whose lock is free) is finished by uploading the file again with the same
  request id, which streams it again under the same broadcast id: the rows already published
  name the same messages, so nobody gets a second one.

Lists and CSVs name users by any ref: each page's refs are
resolved to user ids (one BatchGetUsers) before the message ids are derived, so one user named
by external id and by user id gets one message. A ref identity does not know stays a ref (its
worker fails it ``USER_NOT_FOUND``).

Memory stays flat whatever the audience: nothing holds more than one page of users.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import csv
import io
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
from google.protobuf import struct_pb2, timestamp_pb2
from tidings.delivery.v1 import broadcast_pb2, delivery_service_pb2, message_pb2
from tidings.events.v1.send_request_pb2 import SendRequest as FanOutRecord
from tidings.identity.v1 import user_ref_pb2

from services.delivery.app_settings import ensure_app
from services.delivery.broadcasts_store import apply_deltas, broadcast_from_row
from services.delivery.identity_client import IdentityClient
from services.delivery.ids import uuid5_text
from services.delivery.jobs import record_key, ref_key
from services.delivery.receipts import Fact, record_facts
from services.delivery.sends import check_templates
from services.delivery.validation import MAX_NAME_LENGTH, check_ref, check_spec, parse_uuid
from services.runtime import paging
from services.runtime.app import ServiceContext
from services.runtime.db import DBConnection as Conn
from services.runtime.db import hold_session_state
from services.runtime.errors import (
    Aborted,
    FailedPrecondition,
    FieldViolations,
    InvalidArgument,
    NotFound,
)
from services.runtime.kafka import DELIVERY_REQUESTS
from services.runtime.streams import confirm_stream_end

__all__ = [
    "MAX_LIST_REFS",
    "FanOut",
    "broadcast_csv",
    "cancel_broadcast",
    "create_broadcast",
    "get_broadcast",
    "list_broadcasts",
]

MAX_LIST_REFS = 10_000
PAGE = 1_000
MAX_CHUNK_BYTES = 1024 * 1024
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
_NAMESPACE = uuid.UUID("c3a7b7e2-5f0a-4c1d-8e6b-2d9f4a1b7c30")
_LOCK_SPACE = 0x6272_6F61  # "broa": advisory locks of fan-outs and CSV uploads
#: The error of a CSV upload that broke off; the same request id resumes it.
UPLOAD_INTERRUPTED = "upload interrupted; upload the file again with the same request_id"
#: A CSV job left fanning_out with its lock free this long is failed by the fan-out task (its
#: upload takes the lock before the row is visible: this is only a margin).
_UPLOAD_GRACE = timedelta(seconds=10)


def broadcast_not_found(broadcast_id: str) -> NotFound:
    """The error for a broadcast the app does not have."""
    return NotFound(
        f"broadcast {broadcast_id!r} not found",
        reason="BROADCAST_NOT_FOUND",
        metadata={"broadcast_id": broadcast_id},
    )


def _record(
    app_id: str,
    broadcast_id: uuid.UUID,
    ref: user_ref_pb2.UserRef,
    occurred: timestamp_pb2.Timestamp,
    expire: timestamp_pb2.Timestamp | None,
    data: dict[str, str] | None = None,
) -> FanOutRecord:
    """The record of one user of a broadcast; ids derived from (broadcast, user)."""
    who = ref.user_id if ref.WhichOneof("ref") == "user_id" else ref_key(ref)
    message_id = uuid5_text(_NAMESPACE, f"{broadcast_id}\0{who}")
    record = FanOutRecord(
        event_id=message_id,
        app_id=app_id,
        idempotency_key=f"broadcast:{broadcast_id}:{who}",
        message_id=message_id,
        broadcast_id=str(broadcast_id),
        occurred_at=occurred,
    )
    if ref.WhichOneof("ref") == "user_id":
        record.user_id = ref.user_id
    else:
        record.user.CopyFrom(ref)
    if expire is not None:
        record.expire_time.CopyFrom(expire)
    if data:
        record.data.CopyFrom(struct_pb2.Struct())
        record.data.update(data)
    return record


async def _resolve(
    identity: IdentityClient, app_id: str, refs: Sequence[user_ref_pb2.UserRef]
) -> list[user_ref_pb2.UserRef]:
    """``refs`` with each one identity knows replaced by its user id (one BatchGetUsers), so a
    user named by two refs gets one message id and ledger key. Unknown refs stay as they are."""
    out = list(refs)
    ask = [i for i, ref in enumerate(refs) if ref.WhichOneof("ref") != "user_id"]
    if not ask:
        return out
    users = await identity.batch_get_users(app_id, [refs[i] for i in ask])
    for i, user in zip(ask, users, strict=True):
        if user is not None:
            out[i] = user_ref_pb2.UserRef(user_id=user.user_id)
    return out


def _lock_key(broadcast_id: uuid.UUID) -> int:
    return int(broadcast_id.int & 0x7FFF_FFFF)


async def _try_lock(conn: Conn, broadcast_id: uuid.UUID) -> bool:
    """Take the broadcast's session advisory lock on ``conn`` (marked: the pool drops it)."""
    hold_session_state(conn)
    return bool(
        await conn.fetchval(
            "SELECT pg_try_advisory_lock($1, $2)", _LOCK_SPACE, _lock_key(broadcast_id)
        )
    )


async def _lock_soon(conn: Conn, broadcast_id: uuid.UUID) -> bool:
    """Take the lock, waiting up to 2 s for it (an upload that just failed lets go of it at
    once); False if its holder keeps it."""
    hold_session_state(conn)
    try:
        async with conn.transaction():  # a session lock: it outlives this transaction
            await conn.execute("SET LOCAL lock_timeout = '2s'")
            await conn.execute(
                "SELECT pg_advisory_lock($1, $2)", _LOCK_SPACE, _lock_key(broadcast_id)
            )
    except asyncpg.LockNotAvailableError:
        return False
    return True


async def _unlock(conn: Conn, broadcast_id: uuid.UUID) -> None:
    await conn.execute("SELECT pg_advisory_unlock($1, $2)", _LOCK_SPACE, _lock_key(broadcast_id))


def _validate(broadcast: broadcast_pb2.Broadcast, field: str, *, csv_upload: bool) -> None:
    violations = FieldViolations()
    if len(broadcast.display_name) > MAX_NAME_LENGTH:
        violations.add(f"{field}.display_name", f"at most {MAX_NAME_LENGTH} characters")
    check_spec(violations, f"{field}.spec", broadcast.spec)
    kind = broadcast.audience.WhichOneof("kind")
    if not csv_upload:
        if kind is None or (kind == "all_users" and not broadcast.audience.all_users):
            violations.add(
                f"{field}.audience",
                "choose all_users, segment_id or users",
                reason="REQUIRED",
            )
        elif kind == "csv":
            violations.add(f"{field}.audience.csv", "output only: upload with BroadcastCsv")
        elif kind == "segment_id" and not broadcast.audience.segment_id:
            violations.add(f"{field}.audience.segment_id", "required", reason="REQUIRED")
        elif kind == "users":
            refs = broadcast.audience.users.refs
            if not refs:
                violations.add(f"{field}.audience.users.refs", "at least one", reason="REQUIRED")
            if len(refs) > MAX_LIST_REFS:
                violations.add(
                    f"{field}.audience.users.refs",
                    f"at most {MAX_LIST_REFS:,}; upload larger lists with BroadcastCsv",
                )
            for i, ref in enumerate(refs[:MAX_LIST_REFS]):
                check_ref(violations, f"{field}.audience.users.refs[{i}]", ref)
    violations.raise_if_any()


async def _existing_row(conn: Conn, app_id: str, request_id: str) -> asyncpg.Record | None:
    if not request_id:
        return None
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT * FROM broadcasts WHERE app_id = $1 AND request_id = $2", app_id, request_id
    )
    return row


async def _existing(conn: Conn, app_id: str, request_id: str) -> broadcast_pb2.Broadcast | None:
    row = await _existing_row(conn, app_id, request_id)
    return broadcast_from_row(row) if row is not None else None


async def _insert(
    conn: Conn,
    app_id: str,
    broadcast: broadcast_pb2.Broadcast,
    request_id: str,
    now: datetime,
    broadcast_id: uuid.UUID | None = None,
) -> asyncpg.Record | None:
    await check_templates(conn, app_id, broadcast.spec, "broadcast.spec")
    await ensure_app(conn, app_id)
    row = await conn.fetchrow(
        """
        INSERT INTO broadcasts (app_id, broadcast_id, request_id, display_name, audience, spec,
                                state, create_time, update_time)
        VALUES ($1, $2, $3, $4, $5, $6, 'fanning_out', $7, $7)
        ON CONFLICT (app_id, request_id) WHERE request_id <> '' DO NOTHING
        RETURNING *
        """,
        app_id,
        broadcast_id or uuid.uuid4(),
        request_id,
        broadcast.display_name,
        broadcast.audience.SerializeToString(),
        broadcast.spec.SerializeToString(),
        now,
    )
    assert row is not None or request_id
    return row


def _check_request_id(request_id: str, field: str) -> None:
    if request_id and parse_uuid(request_id) is None:
        violations = FieldViolations()
        violations.add(field, "a UUID", reason="INVALID_FORMAT")
        violations.raise_if_any()


async def create_broadcast(
    ctx: ServiceContext,
    app_id: str,
    request: delivery_service_pb2.BroadcastRequest,
    wake: asyncio.Event,
) -> broadcast_pb2.Broadcast:
    """Store a broadcast to all users, a segment or a list; the fan-out task enqueues it.

    Raises:
        InvalidArgument: Bad audience, spec, templates or request id.
    """
    _validate(request.broadcast, "broadcast", csv_upload=False)
    _check_request_id(request.request_id, "request_id")
    async with ctx.pool.acquire() as conn, conn.transaction():
        existing = await _existing(conn, app_id, request.request_id)
        if existing is not None:
            return existing
        row = await _insert(conn, app_id, request.broadcast, request.request_id, ctx.clock())
        if row is None:  # a concurrent call with the same request id won
            found = await _existing(conn, app_id, request.request_id)
            assert found is not None
            return found
    wake.set()
    return broadcast_from_row(row)


async def get_broadcast(
    pool: asyncpg.Pool, app_id: str, broadcast_id: str
) -> broadcast_pb2.Broadcast:
    """One broadcast with its counts.

    Raises:
        NotFound: The app has no such broadcast.
    """
    parsed = parse_uuid(broadcast_id)
    if parsed is None:
        violations = FieldViolations()
        violations.add("broadcast_id", "a broadcast id (a UUID)", reason="INVALID_FORMAT")
        violations.raise_if_any()
    row = await pool.fetchrow(
        "SELECT * FROM broadcasts WHERE app_id = $1 AND broadcast_id = $2", app_id, parsed
    )
    if row is None:
        raise broadcast_not_found(broadcast_id)
    return broadcast_from_row(row)


async def list_broadcasts(
    pool: asyncpg.Pool, app_id: str, *, page_size: int, page_token: str
) -> delivery_service_pb2.ListBroadcastsResponse:
    """The app's broadcasts, newest first."""
    limit = paging.page_size(page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
    after: tuple[datetime, uuid.UUID] | None = None
    if page_token:
        position = paging.decode_page_token("broadcasts", page_token)
        try:
            after = (datetime.fromisoformat(position["t"]), uuid.UUID(position["i"]))
        except (KeyError, ValueError):
            raise paging.bad_page_token() from None
    rows = await pool.fetch(
        """
        SELECT * FROM broadcasts
        WHERE app_id = $1
          AND ($2::timestamptz IS NULL OR (create_time, broadcast_id) < ($2, $3::uuid))
        ORDER BY create_time DESC, broadcast_id DESC
        LIMIT $4
        """,
        app_id,
        after[0] if after else None,
        after[1] if after else None,
        limit + 1,
    )
    response = delivery_service_pb2.ListBroadcastsResponse(
        broadcasts=[broadcast_from_row(row) for row in rows[:limit]]
    )
    if len(rows) > limit:
        last = rows[limit - 1]
        response.next_page_token = paging.encode_page_token(
            "broadcasts", {"t": last["create_time"].isoformat(), "i": str(last["broadcast_id"])}
        )
    return response


async def cancel_broadcast(
    pool: asyncpg.Pool, app_id: str, broadcast_id: str, now: datetime
) -> broadcast_pb2.Broadcast:
    """Cancel a broadcast: its fan-out stops, waiting messages fail now, and queued ones fail
    when a worker reads them (reason BROADCAST_CANCELLED). Sent ones stay sent.

    Raises:
        NotFound: The app has no such broadcast.
    """
    current = await get_broadcast(pool, app_id, broadcast_id)
    parsed = uuid.UUID(current.broadcast_id)
    async with pool.acquire() as conn, conn.transaction():
        status = await conn.execute(
            """
            UPDATE broadcasts SET state = 'cancelled', update_time = $3
            WHERE app_id = $1 AND broadcast_id = $2 AND state IN ('fanning_out', 'enqueued')
            """,
            app_id,
            parsed,
            now,
        )
        if not status.endswith(" 0"):
            rows = await conn.fetch(
                """
                UPDATE messages SET state = 'failed', status = $4, due_at = NULL,
                                    request = NULL, update_time = $3
                WHERE app_id = $1 AND broadcast_id = $2 AND state IN ('deferred', 'retry_wait')
                RETURNING message_id, user_id, channel, subscription_id, idempotency_key,
                          dispatch
                """,
                app_id,
                parsed,
                now,
                message_pb2.MESSAGE_STATUS_FAILED,
            )
            await record_facts(
                conn,
                [
                    Fact(
                        app_id=app_id,
                        message_id=row["message_id"],
                        user_id=row["user_id"],
                        status=message_pb2.MESSAGE_STATUS_FAILED,
                        time=now,
                        reason="BROADCAST_CANCELLED",
                        detail="the broadcast was cancelled",
                        channel=row["channel"],
                        subscription_id=row["subscription_id"],
                        idempotency_key=row["idempotency_key"],
                        broadcast_id=str(parsed),
                        nth=f"c{row['dispatch']}",
                    )
                    for row in rows
                ],
            )
            await apply_deltas(conn, {(app_id, parsed): [0, len(rows), -len(rows)]})
    return await get_broadcast(pool, app_id, broadcast_id)


def _times(row: asyncpg.Record) -> tuple[timestamp_pb2.Timestamp, timestamp_pb2.Timestamp | None]:
    spec = message_pb2.MessageSpec.FromString(row["spec"])
    occurred = timestamp_pb2.Timestamp()
    occurred.FromDatetime(row["create_time"])
    expire = None
    if spec.HasField("ttl"):
        expire = timestamp_pb2.Timestamp()
        expire.FromDatetime(row["create_time"] + spec.ttl.ToTimedelta())
    return occurred, expire


async def _publish(
    ctx: ServiceContext,
    app_id: str,
    broadcast_id: uuid.UUID,
    records: Sequence[FanOutRecord],
    cursor: str,
    *,
    done: bool = False,
    conn: Conn | None = None,
) -> bool:
    """Publish a page, then save progress; False when the broadcast was cancelled."""
    if records:
        await ctx.producer.send_many(DELIVERY_REQUESTS, [(record_key(r), r) for r in records])
    status = await (conn or ctx.pool).execute(
        """
        UPDATE broadcasts SET enqueued = enqueued + $3, cursor = $4, update_time = $5,
            state = CASE WHEN $6 THEN 'enqueued' ELSE state END,
            enqueued_time = CASE WHEN $6 THEN $5 ELSE enqueued_time END
        WHERE app_id = $1 AND broadcast_id = $2 AND state = 'fanning_out'
        """,
        app_id,
        broadcast_id,
        len(records),
        cursor,
        ctx.clock(),
        done,
    )
    return not status.endswith(" 0")


async def _fail(ctx: ServiceContext, app_id: str, broadcast_id: uuid.UUID, error: str) -> None:
    await ctx.pool.execute(
        """
        UPDATE broadcasts SET state = 'failed', error = $3, update_time = $4
        WHERE app_id = $1 AND broadcast_id = $2 AND state = 'fanning_out'
        """,
        app_id,
        broadcast_id,
        error,
        ctx.clock(),
    )


@dataclass
class FanOut:
    """The fan-out task of one process: runs the ``fanning_out`` broadcasts it can lock.

    Args:
        ctx: The service context.
        identity: Reads audiences.
    """

    ctx: ServiceContext
    identity: IdentityClient
    wake: asyncio.Event

    async def run(self) -> None:
        """Background task: pick up broadcasts to fan out, forever."""
        while True:
            rows = await self.ctx.pool.fetch(
                """
                SELECT * FROM broadcasts WHERE state = 'fanning_out'
                ORDER BY create_time LIMIT 20
                """
            )
            for row in rows:
                audience = broadcast_pb2.Audience.FromString(row["audience"])
                if audience.WhichOneof("kind") == "csv":
                    await self._sweep_upload(row)  # fanned out by its upload call
                    continue
                await self._locked(row, audience)
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 1.0)

    async def _sweep_upload(self, row: asyncpg.Record) -> None:
        """Fail a CSV job whose upload is gone (its lock is free: the process died), so that
        it shows as failed and the same request id resumes it."""
        if self.ctx.clock() - row["update_time"] < _UPLOAD_GRACE:
            return
        async with self.ctx.pool.acquire() as conn:
            if not await _try_lock(conn, row["broadcast_id"]):
                return  # its upload is running
            try:
                await _fail(self.ctx, row["app_id"], row["broadcast_id"], UPLOAD_INTERRUPTED)
            finally:
                await _unlock(conn, row["broadcast_id"])

    async def _locked(self, row: asyncpg.Record, audience: broadcast_pb2.Audience) -> None:
        async with self.ctx.pool.acquire() as conn:
            if not await _try_lock(conn, row["broadcast_id"]):
                return  # another replica has it
            try:
                fresh = await conn.fetchrow(
                    "SELECT * FROM broadcasts WHERE app_id = $1 AND broadcast_id = $2",
                    row["app_id"],
                    row["broadcast_id"],
                )
                if fresh is not None and fresh["state"] == "fanning_out":
                    await self._fan_out(fresh, audience)
            finally:
                await _unlock(conn, row["broadcast_id"])

    async def _fan_out(self, row: asyncpg.Record, audience: broadcast_pb2.Audience) -> None:
        app_id, broadcast_id = row["app_id"], row["broadcast_id"]
        occurred, expire = _times(row)
        kind = audience.WhichOneof("kind")
        try:
            if kind == "all_users":
                cursor = row["cursor"]
                while True:
                    user_ids, cursor = await self.identity.list_user_ids(app_id, cursor)
                    records = [
                        _record(
                            app_id, broadcast_id, user_ref_pb2.UserRef(user_id=u), occurred, expire
                        )
                        for u in user_ids
                    ]
                    if not await _publish(
                        self.ctx, app_id, broadcast_id, records, cursor, done=not cursor
                    ):
                        return
                    if not cursor:
                        return
            elif kind == "users":
                start = int(row["cursor"] or 0)
                refs = audience.users.refs
                while True:
                    page = await _resolve(self.identity, app_id, refs[start : start + PAGE])
                    start += len(page)
                    records = [_record(app_id, broadcast_id, r, occurred, expire) for r in page]
                    done = start >= len(refs)
                    if not await _publish(
                        self.ctx, app_id, broadcast_id, records, str(start), done=done
                    ):
                        return
                    if done:
                        return
            elif kind == "segment_id":
                await self._fan_out_segment(row, audience.segment_id, occurred, expire)
        except NotFound as exc:
            await _fail(self.ctx, app_id, broadcast_id, exc.message)

    async def _fan_out_segment(
        self,
        row: asyncpg.Record,
        segment_id: str,
        occurred: timestamp_pb2.Timestamp,
        expire: timestamp_pb2.Timestamp | None,
    ) -> None:
        """Members come in user id order; the cursor is the last user id published, so a
        resumed fan-out starts after it whoever joined or left meanwhile (a count would
        shift when a lower id left or joined)."""
        app_id, broadcast_id = row["app_id"], row["broadcast_id"]
        cursor: str = row["cursor"]
        page_records: list[FanOutRecord] = []
        async for user_id in self.identity.segment_members(
            app_id, segment_id, after_user_id=cursor
        ):
            page_records.append(
                _record(
                    app_id,
                    broadcast_id,
                    user_ref_pb2.UserRef(user_id=user_id),
                    occurred,
                    expire,
                )
            )
            if len(page_records) >= PAGE:
                cursor = page_records[-1].user_id
                if not await _publish(self.ctx, app_id, broadcast_id, page_records, cursor):
                    return
                page_records = []
        if page_records:
            cursor = page_records[-1].user_id
        await _publish(self.ctx, app_id, broadcast_id, page_records, cursor, done=True)


class _CsvRows:
    """Incremental CSV parsing: feed bytes, get complete rows (quotes may span chunks)."""

    def __init__(self) -> None:
        self._pending = ""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes, *, final: bool = False) -> list[list[str]]:
        text = self._pending + self._utf8.decode(data, final=final)
        cut = len(text) if final else _last_row_end(text)
        complete, self._pending = text[:cut], text[cut:]
        if not complete:
            return []
        return list(csv.reader(io.StringIO(complete)))


def _last_row_end(text: str) -> int:
    """Index just after the last newline that is outside quotes (0 if none)."""
    inside = False
    end = 0
    for index, char in enumerate(text):
        if char == '"':
            inside = not inside
        elif char == "\n" and not inside:
            end = index + 1
    return end


def _csv_ref(column: str, value: str) -> user_ref_pb2.UserRef | None:
    value = value.strip()
    if not value:
        return None
    if column == "user_id":
        return user_ref_pb2.UserRef(user_id=value) if parse_uuid(value) else None
    if column == "external_id":
        return user_ref_pb2.UserRef(external_id=value)
    if column == "subscription_id":
        return user_ref_pb2.UserRef(subscription_id=value) if parse_uuid(value) else None
    label = column.split(".", 1)[1]
    return user_ref_pb2.UserRef(alias=user_ref_pb2.UserRef.Alias(label=label, value=value))


def _csv_options(
    first: delivery_service_pb2.BroadcastCsvRequest | None,
) -> delivery_service_pb2.BroadcastCsvOptions:
    """The upload's options, checked.

    Raises:
        InvalidArgument: No options first, bad options.
    """
    if first is None or first.WhichOneof("part") != "options":
        raise InvalidArgument(
            "send the options first, then the file",
            reason="OPTIONS_REQUIRED",
        )
    options = first.options
    _validate(options.broadcast, "options.broadcast", csv_upload=True)
    _check_request_id(options.request_id, "options.request_id")
    column = options.ref_column
    if column not in ("user_id", "external_id", "subscription_id") and not (
        column.startswith("alias.") and len(column) > len("alias.")
    ):
        violations = FieldViolations()
        violations.add(
            "options.ref_column",
            "user_id, external_id, subscription_id or alias.<label>",
            reason="REQUIRED",
        )
        violations.raise_if_any()
    return options


async def broadcast_csv(
    ctx: ServiceContext,
    app_id: str,
    requests: AsyncIterator[delivery_service_pb2.BroadcastCsvRequest],
    identity: IdentityClient,
) -> broadcast_pb2.Broadcast:
    """A broadcast to the users of an uploaded CSV, enqueued as the file streams in. With the
    request id of an upload that broke off, the file is streamed again into that broadcast.

    ``identity`` resolves each page's refs to user ids (one user named by two refs: one message).

    Raises:
        InvalidArgument: No options first, bad options, a chunk too large, a file without the
            ref column.
        Aborted: The upload of this request id is still running.
        FailedPrecondition: The request id names an upload with other options.
    """
    options = _csv_options(await anext(requests, None))
    broadcast = broadcast_pb2.Broadcast()
    broadcast.CopyFrom(options.broadcast)
    broadcast.audience.csv.CopyFrom(broadcast_pb2.Audience.CsvFile(ref_column=options.ref_column))
    # This connection holds the job's advisory lock for the whole upload (so other calls and
    # the fan-out task know it is alive) and saves its progress.
    async with ctx.pool.acquire() as conn:
        job = await _claim_upload(ctx, conn, app_id, broadcast, options.request_id)
        if not isinstance(job, broadcast_pb2.Broadcast):
            await _run_upload(ctx, conn, identity, app_id, job, broadcast, requests)
    if isinstance(job, broadcast_pb2.Broadcast):
        async for _ in requests:
            pass
        return job
    return await get_broadcast(ctx.pool, app_id, str(job["broadcast_id"]))


async def _run_upload(
    ctx: ServiceContext,
    conn: Conn,
    identity: IdentityClient,
    app_id: str,
    job: asyncpg.Record,
    broadcast: broadcast_pb2.Broadcast,
    requests: AsyncIterator[delivery_service_pb2.BroadcastCsvRequest],
) -> None:
    """Stream the file into the job locked on ``conn``; whatever stops it fails the job (the
    same request id resumes it)."""
    try:
        await _Upload(ctx, conn, identity, app_id, job, broadcast).stream(requests)
    except BaseException as exc:
        reason = exc.message if isinstance(exc, InvalidArgument) else UPLOAD_INTERRUPTED
        # On the pool, not ``conn``: a second cancellation may release ``conn`` meanwhile.
        await asyncio.shield(_fail(ctx, app_id, job["broadcast_id"], reason))
        raise
    # The lock goes when ``conn`` returns to the pool (reset in full: see hold_session_state),
    # even when a cancelled query left ``conn`` unusable.


async def _claim_upload(
    ctx: ServiceContext,
    conn: Conn,
    app_id: str,
    broadcast: broadcast_pb2.Broadcast,
    request_id: str,
) -> asyncpg.Record | broadcast_pb2.Broadcast:
    """The job this upload streams into, its lock taken on ``conn``: a new one, or the
    unfinished CSV job of the same request id; or the answer of a finished job."""
    new_id = uuid.uuid4()
    while not await _try_lock(conn, new_id):  # a lock key is 31 bits: skip one in use
        new_id = uuid.uuid4()
    # Locked before its row is visible, so no one ever sees a new upload unlocked.
    async with conn.transaction():
        row = await _existing_row(conn, app_id, request_id)
        if row is None:
            row = await _insert(conn, app_id, broadcast, request_id, ctx.clock(), new_id)
            if row is not None:
                return row
            row = await _existing_row(conn, app_id, request_id)  # a concurrent call won
            assert row is not None
    await _unlock(conn, new_id)
    return await _reopen(ctx, conn, row, broadcast, request_id)


async def _reopen(
    ctx: ServiceContext,
    conn: Conn,
    row: asyncpg.Record,
    broadcast: broadcast_pb2.Broadcast,
    request_id: str,
) -> asyncpg.Record | broadcast_pb2.Broadcast:
    """Take over the CSV job of a broken-off upload (failed, or fanning out with its lock free)
    to stream the file again; other jobs of the request id are answered as they are."""
    audience = broadcast_pb2.Audience.FromString(row["audience"])
    if row["state"] not in ("fanning_out", "failed") or audience.WhichOneof("kind") != "csv":
        return broadcast_from_row(row)
    if audience.csv.ref_column != broadcast.audience.csv.ref_column or (
        message_pb2.MessageSpec.FromString(row["spec"]) != broadcast.spec
    ):
        raise FailedPrecondition(
            "options.request_id names an upload with another ref_column or spec",
            reason="REQUEST_ID_REUSED",
            metadata={"request_id": request_id},
        )
    broadcast_id = row["broadcast_id"]
    if not await _lock_soon(conn, broadcast_id):
        raise Aborted(
            f"the upload of options.request_id {request_id} is still running; "
            "retry once it has ended",
            reason="BROADCAST_UPLOAD_RUNNING",
            metadata={"request_id": request_id, "broadcast_id": str(broadcast_id)},
        )
    # The file is streamed again from its start: enqueued counts this upload's rows.
    reopened: asyncpg.Record | None = await conn.fetchrow(
        """
        UPDATE broadcasts SET state = 'fanning_out', error = '', enqueued = 0, cursor = '',
                              update_time = $3
        WHERE app_id = $1 AND broadcast_id = $2 AND state IN ('fanning_out', 'failed')
        RETURNING *
        """,
        row["app_id"],
        broadcast_id,
        ctx.clock(),
    )
    if reopened is None:  # cancelled meanwhile
        await _unlock(conn, broadcast_id)
        return await get_broadcast(ctx.pool, row["app_id"], str(broadcast_id))
    return reopened


class _Upload:
    """One CSV file streamed into a broadcast job, page by page."""

    def __init__(
        self,
        ctx: ServiceContext,
        conn: Conn,
        identity: IdentityClient,
        app_id: str,
        row: asyncpg.Record,
        broadcast: broadcast_pb2.Broadcast,
    ) -> None:
        self._ctx, self._conn, self._identity, self._app_id = ctx, conn, identity, app_id
        self._id: uuid.UUID = row["broadcast_id"]
        self._times = _times(row)
        self._broadcast = broadcast
        self._column = broadcast.audience.csv.ref_column
        self._header: list[str] | None = None
        self._ref_index = -1
        self._rows = self._rejected = 0
        self._page: list[tuple[user_ref_pb2.UserRef, dict[str, str]]] = []

    async def stream(
        self, requests: AsyncIterator[delivery_service_pb2.BroadcastCsvRequest]
    ) -> None:
        """Read the chunks, publish full pages, then the last one with the row counts."""
        parser = _CsvRows()
        async for message in requests:
            if message.WhichOneof("part") != "chunk":
                raise InvalidArgument(
                    "only chunks may follow the options", reason="CSV_CHUNK_EXPECTED"
                )
            if len(message.chunk) > MAX_CHUNK_BYTES:
                raise InvalidArgument("a chunk is at most 1 MiB", reason="CSV_CHUNK_TOO_LARGE")
            self._take(parser.feed(message.chunk))
            if len(self._page) >= PAGE and not await self._publish():
                break  # cancelled
        await confirm_stream_end()  # a client gone mid-file must not look like a whole file
        self._take(parser.feed(b"", final=True))
        if self._header is None:
            raise InvalidArgument("the file is empty", reason="CSV_EMPTY")
        csv_file = self._broadcast.audience.csv
        csv_file.rows, csv_file.rejected_rows = self._rows, self._rejected
        await self._conn.execute(
            "UPDATE broadcasts SET audience = $3 WHERE app_id = $1 AND broadcast_id = $2",
            self._app_id,
            self._id,
            self._broadcast.audience.SerializeToString(),
        )
        await self._publish(done=True)

    def _take(self, rows: list[list[str]]) -> None:
        for cells in rows:
            if self._header is None:
                self._header = [cell.strip() for cell in cells]
                if self._column not in self._header:
                    raise InvalidArgument(
                        f"the file has no {self._column!r} column",
                        reason="CSV_REF_COLUMN_MISSING",
                    )
                self._ref_index = self._header.index(self._column)
                continue
            if not any(cell.strip() for cell in cells):
                continue
            self._rows += 1
            index = self._ref_index
            ref = _csv_ref(self._column, cells[index]) if index < len(cells) else None
            if ref is None:
                self._rejected += 1
                continue
            data = {
                name: cells[i]
                for i, name in enumerate(self._header)
                if i != index and i < len(cells) and name
            }
            self._page.append((ref, data))

    async def _publish(self, *, done: bool = False) -> bool:
        """Resolve and publish the page; False when the broadcast was cancelled."""
        refs = await _resolve(self._identity, self._app_id, [ref for ref, _ in self._page])
        occurred, expire = self._times
        records = [
            _record(self._app_id, self._id, ref, occurred, expire, data)
            for ref, (_, data) in zip(refs, self._page, strict=True)
        ]
        self._page = []
        return await _publish(
            self._ctx, self._app_id, self._id, records, "", done=done, conn=self._conn
        )
