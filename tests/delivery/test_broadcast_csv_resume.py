"""CSV broadcasts that broke off: the same request id streams the file again into the same
broadcast, and every row still gets exactly one message."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
from tidings.delivery.v1 import broadcast_pb2
from tidings.delivery.v1 import delivery_service_pb2 as dpb

from services.delivery.broadcasts import UPLOAD_INTERRUPTED
from tests.delivery.sink import Sink
from tests.delivery.support import DeliveryHarness
from tests.delivery.test_broadcasts import _broadcast, _wait_done
from tests.identity.support import failure
from tests.polling import eventually

B = broadcast_pb2.Broadcast
#: More rows than a fan-out page (1,000), so the first part is published before the break.
FIRST_PART_FILLER = 1_100


def _options(sink: Sink, request_id: str, column: str = "external_id") -> dpb.BroadcastCsvOptions:
    return dpb.BroadcastCsvOptions(
        broadcast=_broadcast(sink, broadcast_pb2.Audience()),
        ref_column=column,
        request_id=request_id,
    )


async def _upload(
    options: dpb.BroadcastCsvOptions, payload: bytes
) -> AsyncIterator[dpb.BroadcastCsvRequest]:
    yield dpb.BroadcastCsvRequest(options=options)
    yield dpb.BroadcastCsvRequest(chunk=payload)


async def _only_broadcast(harness: DeliveryHarness) -> B:
    listed = await harness.delivery.ListBroadcasts(
        dpb.ListBroadcastsRequest(), metadata=harness.server
    )
    [found] = listed.broadcasts
    return found  # type: ignore[no-any-return]


async def _in_state(harness: DeliveryHarness, broadcast_id: str, state: int) -> B | None:
    found = await harness.delivery.GetBroadcast(
        dpb.GetBroadcastRequest(broadcast_id=broadcast_id), metadata=harness.server
    )
    return found if found.state == state else None


def _lines(rows: list[str]) -> bytes:
    return "".join(f"{row}\n" for row in rows).encode()


async def test_interrupted_upload_resumes_with_the_same_request_id(
    harness: DeliveryHarness, sink: Sink
) -> None:
    await harness.webhook_channel()
    users = [await harness.user() for _ in range(4)]
    named = [f"{u.external_id},C{i}" for i, u in enumerate(users)]
    nobody = [f"nobody-{i},F" for i in range(FIRST_PART_FILLER + 200)]
    first_part = _lines(["external_id,code", *named[:2], *nobody[:FIRST_PART_FILLER]])
    whole = first_part + _lines([*nobody[FIRST_PART_FILLER:], *named[2:]])
    total = len(named) + len(nobody)
    options = _options(sink, str(uuid.uuid4()))
    never = asyncio.Event()

    async def broken_off() -> AsyncIterator[dpb.BroadcastCsvRequest]:
        yield dpb.BroadcastCsvRequest(options=options)
        yield dpb.BroadcastCsvRequest(chunk=first_part)
        await never.wait()  # the client stalls, then goes away

    call = harness.delivery.BroadcastCsv(broken_off(), metadata=harness.server)

    async def first_page_enqueued() -> B | None:
        listed = await harness.delivery.ListBroadcasts(
            dpb.ListBroadcastsRequest(), metadata=harness.server
        )
        return next((b for b in listed.broadcasts if b.enqueued_count > 0), None)

    job = await eventually(first_page_enqueued, what="the first page enqueued")
    assert job is not None
    running = await failure(
        harness.delivery.BroadcastCsv(_upload(options, whole), metadata=harness.server)
    )
    assert (running.code, running.reason) == (grpc.StatusCode.ABORTED, "BROADCAST_UPLOAD_RUNNING")
    assert options.request_id in running.message

    call.cancel()
    failed = await eventually(
        lambda: _in_state(harness, job.broadcast_id, B.STATE_FAILED), what="the job failed"
    )
    assert failed is not None
    assert failed.error == UPLOAD_INTERRUPTED

    resumed = await harness.delivery.BroadcastCsv(_upload(options, whole), metadata=harness.server)
    assert resumed.broadcast_id == job.broadcast_id
    assert (resumed.state, resumed.enqueued_count, resumed.audience.csv.rows) == (
        B.STATE_ENQUEUED,
        total,
        total,
    )
    done = await _wait_done(harness, job.broadcast_id, total)
    assert (done.sent_count, done.failed_count) == (4, total - 4)  # the others: USER_NOT_FOUND
    got = {json.loads(r.body)["user"]: json.loads(r.body)["code"] for r in sink.received}
    assert got == {u.user_id: f"C{i}" for i, u in enumerate(users)}
    assert sink.duplicates == 0
    assert (await _only_broadcast(harness)).broadcast_id == job.broadcast_id  # no second job


async def test_an_upload_whose_process_died_is_failed_and_resumable(
    harness: DeliveryHarness, sink: Sink
) -> None:
    await harness.webhook_channel()
    users = [await harness.user() for _ in range(2)]
    options = _options(sink, str(uuid.uuid4()))
    broadcast = broadcast_pb2.Broadcast()
    broadcast.CopyFrom(options.broadcast)
    broadcast.audience.csv.ref_column = "external_id"
    # What a process that died mid-upload leaves: the job fanning out, its lock free.
    broadcast_id = uuid.uuid4()
    conn = await asyncpg.connect(harness.database_url)
    try:
        await conn.execute(
            """
            INSERT INTO broadcasts (app_id, broadcast_id, request_id, display_name, audience,
                                    spec, state, enqueued, create_time, update_time)
            VALUES ($1, $2, $3, 'died', $4, $5, 'fanning_out', 1, now() - interval '1 hour',
                    now() - interval '1 hour')
            """,
            harness.app.app_id,
            broadcast_id,
            options.request_id,
            broadcast.audience.SerializeToString(),
            broadcast.spec.SerializeToString(),
        )
    finally:
        await conn.close()
    failed = await eventually(
        lambda: _in_state(harness, str(broadcast_id), B.STATE_FAILED), what="the job failed"
    )
    assert failed is not None
    assert failed.error == UPLOAD_INTERRUPTED

    payload = _lines(["external_id", *(u.external_id for u in users)])
    other = await failure(
        harness.delivery.BroadcastCsv(
            _upload(_options(sink, options.request_id, column="user_id"), payload),
            metadata=harness.server,
        )
    )
    assert (other.code, other.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "REQUEST_ID_REUSED",
    )
    assert "options.request_id" in other.message

    resumed = await harness.delivery.BroadcastCsv(
        _upload(options, payload), metadata=harness.server
    )
    assert (resumed.broadcast_id, resumed.state, resumed.enqueued_count) == (
        str(broadcast_id),
        B.STATE_ENQUEUED,
        2,
    )
    await _wait_done(harness, str(broadcast_id), 2)
    assert sorted(json.loads(r.body)["user"] for r in sink.received) == sorted(
        u.user_id for u in users
    )
    assert sink.duplicates == 0
