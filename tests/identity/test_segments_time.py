"""Segments on an identity process of their own, whose database the tests also reach directly:
time-relative segments re-checked on a (short) schedule so users leave as time passes, import
lists (:func:`segments_store.create_list_segment`, as an import calls it) used by other
segments, and a materialisation a crash left pending finished by the maintainer's sweep.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from tidings.events.v1.identity_change_pb2 import IdentityChange
from tidings.identity.v1 import apps_service_pb2_grpc, identity_service_pb2_grpc
from tidings.identity.v1 import segment_pb2 as sp

from services.identity import segments_store
from tests.conftest import temporary_database
from tests.e2e.processes import running_service
from tests.identity.conftest import TestApp, create_test_app
from tests.identity.support import ChangeFeed, ext, failure
from tests.identity.test_segments_support import (
    Op,
    all_,
    attr,
    create_segment,
    event,
    member_external_ids,
    member_of,
    track,
    upsert,
)
from tests.polling import eventually

ENTERED = IdentityChange.KIND_SEGMENT_ENTERED
EXITED = IdentityChange.KIND_SEGMENT_EXITED

#: The schedule of time-relative re-checks in these tests.
REFRESH_SECONDS = 1


class Service:
    """The process's stubs and its database."""

    def __init__(self, channel: grpc.aio.Channel, dsn: str) -> None:
        self.identity: Any = identity_service_pb2_grpc.IdentityServiceStub(channel)
        self.apps: Any = apps_service_pb2_grpc.AppsServiceStub(channel)
        self.dsn = dsn


@pytest.fixture(scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Service]:
    async with (
        temporary_database() as dsn,
        running_service(
            "identity",
            database_url=dsn,
            log_dir=tmp_path_factory.mktemp("identity-segments"),
            env={"TIDINGS_SEGMENT_REFRESH_SECONDS": str(REFRESH_SECONDS)},
        ) as process,
    ):
        await process.wait_serving()
        async with grpc.aio.insecure_channel(process.grpc_target) as channel:
            yield Service(channel, dsn)


@pytest.fixture
async def own_app(service: Service) -> TestApp:
    return await create_test_app(service.apps)


def facts_of(feed: ChangeFeed, segment_id: str) -> list[tuple[int, str]]:
    return [
        (c.kind, c.external_id)
        for c in feed.changes
        if c.segment_id == segment_id and c.kind in (ENTERED, EXITED)
    ]


async def test_users_leave_as_time_passes(service: Service, own_app: TestApp) -> None:
    stub = service.identity
    await upsert(stub, own_app, "ana")
    span = duration_pb2.Duration()
    span.FromTimedelta(timedelta(seconds=3))
    async with ChangeFeed(own_app.app_id) as feed:
        segment = await create_segment(stub, own_app, event("purchase", within_last=span))
        await track(stub, own_app, "ana", "purchase")
        await feed.until(lambda _: facts_of(feed, segment.segment_id) == [(ENTERED, "ana")])
        entered = datetime.now(UTC)
        # Nothing else happens to ana: the schedule alone moves her out once the event is
        # older than the window.
        await feed.until(
            lambda _: facts_of(feed, segment.segment_id) == [(ENTERED, "ana"), (EXITED, "ana")],
            within=20,
        )
        assert datetime.now(UTC) - entered >= timedelta(seconds=2)
    assert await member_external_ids(stub, own_app, segment.segment_id) == set()


async def test_import_lists_as_segments(service: Service, own_app: TestApp) -> None:
    stub = service.identity
    ids = {name: await upsert(stub, own_app, name, {"plan": "gold"}) for name in ("a", "b", "c")}
    conn = await asyncpg.connect(service.dsn)
    try:
        async with conn.transaction():
            await conn.execute("CREATE TEMPORARY TABLE imported (user_id uuid) ON COMMIT DROP")
            await conn.execute(
                "INSERT INTO imported SELECT unnest($1::uuid[])",
                [uuid.UUID(ids["a"]), uuid.UUID(ids["b"])],
            )
            list_id = await segments_store.create_list_segment(
                conn,
                own_app.app_id,
                display_name="Imported",
                import_id="job-1",
                members_table="imported",
                at=datetime.now(UTC),
            )
    finally:
        await conn.close()
    listed = await stub.GetSegment(
        sp.GetSegmentRequest(segment_id=list_id), metadata=own_app.server
    )
    assert (listed.kind, listed.import_id, listed.member_count) == (
        sp.Segment.KIND_LIST,
        "job-1",
        2,
    )
    assert not listed.HasField("condition")
    assert await member_external_ids(stub, own_app, list_id) == {"a", "b"}
    counted = await stub.CountSegment(
        sp.CountSegmentRequest(segment_id=list_id), metadata=own_app.server
    )
    assert counted.count == 2
    explained = await stub.ExplainSegmentMembership(
        sp.ExplainSegmentMembershipRequest(segment_id=list_id, user=ext("a")),
        metadata=own_app.server,
    )
    assert explained.member
    assert not explained.HasField("result")
    # Other segments use the list; a list has no condition to change.
    gold_on_list = await create_segment(
        stub,
        own_app,
        all_(member_of(list_id), attr("attributes.plan", Op.OPERATOR_EQUALS, "gold")),
    )
    assert await member_external_ids(stub, own_app, gold_on_list.segment_id) == {"a", "b"}
    refused = await failure(
        stub.UpdateSegment(
            sp.UpdateSegmentRequest(
                segment=sp.Segment(
                    segment_id=list_id, condition=attr("country", Op.OPERATOR_EXISTS)
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["condition"]),
            ),
            metadata=own_app.server,
        )
    )
    assert (refused.code, refused.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "LIST_SEGMENT_CONDITION",
    )
    renamed = await stub.UpdateSegment(
        sp.UpdateSegmentRequest(
            segment=sp.Segment(segment_id=list_id, display_name="Imported in May"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        metadata=own_app.server,
    )
    assert renamed.display_name == "Imported in May"


async def test_an_abandoned_materialisation_is_finished(service: Service, own_app: TestApp) -> None:
    """A CreateSegment whose process died between saving and materialising leaves the segment
    pending; the maintainer's sweep finishes it."""
    stub = service.identity
    await upsert(stub, own_app, "ana", {"plan": "gold"})
    condition = {
        "attribute": {
            "field": "attributes.plan",
            "type": "string",
            "operator": "equals",
            "values": [{"s": "gold"}],
            "days": 0,
        }
    }
    segment_id = uuid.uuid4()
    conn = await asyncpg.connect(service.dsn)
    try:
        await conn.execute(
            "INSERT INTO segments (app_id, segment_id, display_name, kind, condition, "
            "create_time, update_time) VALUES ($1, $2, 'pending', 'dynamic', $3::jsonb, "
            "now() - interval '2 minutes', now() - interval '2 minutes')",
            own_app.app_id,
            segment_id,
            json.dumps(condition),
        )
    finally:
        await conn.close()

    async def members() -> set[str]:
        return await member_external_ids(stub, own_app, str(segment_id))

    await eventually(members, lambda found: found == {"ana"}, within=90, what="materialisation")
