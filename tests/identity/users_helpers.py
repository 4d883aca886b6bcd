"""Helpers of the profile tests: refs, reading rich error details, the change feed."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from aiokafka import AIOKafkaConsumer, TopicPartition
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from tidings.events.v1.identity_change_pb2 import IdentityChange
from tidings.identity.v1 import user_pb2, user_ref_pb2

from services.runtime.kafka import IDENTITY_CHANGES
from tests.conftest import KAFKA_BOOTSTRAP
from tests.runtime.kafka_helpers import partitions_of


def ext(external_id: str) -> user_ref_pb2.UserRef:
    """A ref by external id."""
    return user_ref_pb2.UserRef(external_id=external_id)


def by_id(user_id: str) -> user_ref_pb2.UserRef:
    """A ref by Tidings' user id."""
    return user_ref_pb2.UserRef(user_id=user_id)


def by_alias(label: str, value: str) -> user_ref_pb2.UserRef:
    """A ref by alias."""
    return user_ref_pb2.UserRef(alias=user_ref_pb2.UserRef.Alias(label=label, value=value))


def new_id(prefix: str = "c") -> str:
    """An external id no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def s(value: str) -> user_pb2.AttributeValue:
    """A string attribute value."""
    return user_pb2.AttributeValue(string_value=value)


def n(value: float) -> user_pb2.AttributeValue:
    """A number attribute value."""
    return user_pb2.AttributeValue(number_value=value)


def b(value: bool) -> user_pb2.AttributeValue:
    """A bool attribute value."""
    return user_pb2.AttributeValue(bool_value=value)


NULL = user_pb2.AttributeValue(null_value=struct_pb2.NULL_VALUE)


@dataclass(frozen=True)
class Failure:
    """What a failed call said: code, ErrorInfo reason and the BadRequest field names."""

    code: grpc.StatusCode
    reason: str
    fields: list[str]
    message: str


def _details(status: status_pb2.Status) -> tuple[str, list[str]]:
    reason, fields = "", []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [violation.field for violation in bad.field_violations]
    return reason, fields


async def failure(call: Awaitable[Any]) -> Failure:
    """Await a call that must fail; what its rich status says."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        reason, fields = _details(status) if status is not None else ("", [])
        return Failure(error.code(), reason, fields, error.details() or "")
    raise AssertionError("the call succeeded")


def item_failure(status: status_pb2.Status) -> Failure:
    """What the per-item error of a batch answer says."""
    reason, fields = _details(status)
    code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
    return Failure(code, reason, fields, status.message)


class ChangeFeed:
    """Reads ``identity.changes`` from where it ended when the feed was opened.

    Opened before the calls under test, so it reads only what they (and concurrent tests)
    published, as a ``read_committed`` consumer in no group::

        async with ChangeFeed() as feed:
            ...calls...
            facts = await feed.wait_for([user_id], 2)
    """

    def __init__(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=KAFKA_BOOTSTRAP,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        self._seen: list[IdentityChange] = []

    async def __aenter__(self) -> ChangeFeed:
        await self._consumer.start()
        partitions = await partitions_of(KAFKA_BOOTSTRAP, IDENTITY_CHANGES.name)
        tps = [TopicPartition(IDENTITY_CHANGES.name, p) for p in partitions]
        self._consumer.assign(tps)
        for tp, offset in (await self._consumer.end_offsets(tps)).items():
            self._consumer.seek(tp, offset)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._consumer.stop()

    async def wait_for(
        self, user_ids: Iterable[str], expected: int, *, within: float = 20.0
    ) -> list[IdentityChange]:
        """The facts about ``user_ids`` once there are at least ``expected`` of them.

        Fails the test if they do not arrive within ``within`` seconds.
        """
        wanted = set(user_ids)
        deadline = time.monotonic() + within
        while True:
            found = [fact for fact in self._seen if fact.user_id in wanted]
            if len(found) >= expected:
                return found
            assert time.monotonic() < deadline, (
                f"only {len(found)} of {expected} change facts arrived: {found}"
            )
            batch = await self._consumer.getmany(timeout_ms=200)
            for records in batch.values():
                self._seen.extend(
                    IDENTITY_CHANGES.decode(record.value)
                    for record in records
                    if record.value is not None
                )
