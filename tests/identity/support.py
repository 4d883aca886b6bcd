"""Helpers of the identity tests: refs, attribute values, registrations, error details, the feed.

Ids and tokens are random so every test registers its own. The change feed reads
``identity.changes`` from the moment it opens, so a test can wait (with a deadline, never a fixed
sleep) for the facts its calls published through the outbox.
"""

from __future__ import annotations

import base64
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast

import grpc
import grpc.aio
from aiokafka import AIOKafkaConsumer, TopicPartition
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from tidings.events.v1.identity_change_pb2 import IdentityChange
from tidings.identity.v1 import identity_service_pb2 as pb
from tidings.identity.v1 import subscription_pb2 as spb
from tidings.identity.v1 import user_pb2, user_ref_pb2

from services.identity.subscriptions_store import DeviceInfo, OptIn, Subscription, SubscriptionType
from services.runtime.kafka import IDENTITY_CHANGES
from tests.conftest import KAFKA_BOOTSTRAP
from tests.runtime.kafka_helpers import partitions_of

Kind = IdentityChange.Kind

# --- refs and ids -------------------------------------------------------------------------------


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


# --- attribute values ---------------------------------------------------------------------------


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

# --- subscriptions ------------------------------------------------------------------------------

IOS = spb.SUBSCRIPTION_TYPE_IOS_PUSH
ANDROID = spb.SUBSCRIPTION_TYPE_ANDROID_PUSH
WEB = spb.SUBSCRIPTION_TYPE_WEB_PUSH
EMAIL = spb.SUBSCRIPTION_TYPE_EMAIL
SMS = spb.SUBSCRIPTION_TYPE_SMS
WHATSAPP = spb.SUBSCRIPTION_TYPE_WHATSAPP
TELEGRAM = spb.SUBSCRIPTION_TYPE_TELEGRAM


def b64url(data: bytes) -> str:
    """Unpadded base64url, as browsers hand out web push keys."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def web_push_keys() -> spb.WebPushKeys:
    """Well-formed keys: a 65-byte uncompressed point and a 16-byte secret."""
    return spb.WebPushKeys(
        p256dh=b64url(b"\x04" + secrets.token_bytes(64)), auth=b64url(secrets.token_bytes(16))
    )


def ios_token() -> str:
    """A fresh APNs-shaped token (32 bytes, hex)."""
    return secrets.token_hex(32)


def android_token() -> str:
    """A fresh FCM-shaped registration token."""
    return f"f{secrets.token_hex(8)}:APA91b{secrets.token_urlsafe(60)}"


def endpoint() -> str:
    """A fresh web push endpoint."""
    return f"https://fcm.googleapis.com/fcm/send/{uuid.uuid4()}"


def email() -> str:
    """A fresh email address."""
    return f"user.{uuid.uuid4().hex[:12]}@example.com"


def phone() -> str:
    """A fresh valid E.164 Spanish mobile number."""
    return f"+346{secrets.randbelow(10**8):08d}"


def chat_id() -> str:
    """A fresh Telegram chat id."""
    return str(10**9 + secrets.randbelow(10**9))


def push(kind: spb.SubscriptionType.ValueType = IOS) -> spb.Subscription:
    """A registration of a fresh push token of ``kind`` (ios, android or web)."""
    if kind == WEB:
        return spb.Subscription(type=WEB, token=endpoint(), web_push_keys=web_push_keys())
    return spb.Subscription(type=kind, token=ios_token() if kind == IOS else android_token())


def address(kind: spb.SubscriptionType.ValueType = EMAIL) -> spb.Subscription:
    """A registration of a fresh address of ``kind`` (email, sms, whatsapp, telegram)."""
    token = {EMAIL: email, SMS: phone, WHATSAPP: phone, TELEGRAM: chat_id}[kind]()
    return spb.Subscription(type=kind, token=token)


def create(
    subscription: spb.Subscription, user: user_ref_pb2.UserRef | None = None
) -> pb.CreateSubscriptionRequest:
    """A CreateSubscription request."""
    return pb.CreateSubscriptionRequest(subscription=subscription, user=user)


def record(
    type_: SubscriptionType = SubscriptionType.IOS_PUSH,
    *,
    active_minutes_ago: int = 0,
    user_id: uuid.UUID | None = None,
    enabled: bool = True,
    disabled_reason: str = "",
) -> Subscription:
    """A stored subscription record for unit tests of the pure rules."""
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    active = now - timedelta(minutes=active_minutes_ago)
    return Subscription(
        app_id="app",
        subscription_id=uuid.uuid4(),
        user_id=user_id or uuid.uuid4(),
        type=type_,
        token=secrets.token_hex(32),
        web_push_keys=None,
        enabled=enabled,
        disabled_reason=disabled_reason,
        opt_in=OptIn.SUBSCRIBED,
        opt_in_change_time=active,
        opt_in_reason="",
        device=DeviceInfo(),
        last_active_time=active,
        token_time=active,
        create_time=active,
        update_time=active,
    )


# --- errors -------------------------------------------------------------------------------------


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


async def failure(call: object) -> Failure:
    """Await a call (any gRPC call object or coroutine) that must fail; what its status says."""
    try:
        await cast("Awaitable[object]", call)
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


# --- the change feed ----------------------------------------------------------------------------


class ChangeFeed:
    """The facts put on ``identity.changes`` since the feed opened (of one app, if given).

    Opened before the calls under test, so it reads only what they (and concurrent tests)
    published, as a ``read_committed`` consumer in no group::

        async with ChangeFeed(app.app_id) as feed:
            ...calls...
            [fact] = await feed.wait_for(Kind.KIND_USER_UPDATED)
            facts = await feed.about([user_id], 2)
    """

    def __init__(self, app_id: str = "") -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=KAFKA_BOOTSTRAP,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        self._app_id = app_id
        self.changes: list[IdentityChange] = []

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

    async def _poll(self) -> None:
        batches = await self._consumer.getmany(timeout_ms=200)
        for records in batches.values():
            for record in records:
                if record.value is None:
                    continue
                change = IDENTITY_CHANGES.decode(record.value)
                if not self._app_id or change.app_id == self._app_id:
                    self.changes.append(change)

    async def until(
        self, predicate: Callable[[list[IdentityChange]], bool], within: float = 20.0
    ) -> list[IdentityChange]:
        """Poll until ``predicate(changes)`` holds; returns the changes seen.

        Raises:
            TimeoutError: It did not hold within ``within`` seconds.
        """
        deadline = time.monotonic() + within
        while not predicate(self.changes):
            if time.monotonic() > deadline:
                kinds = [(Kind.Name(c.kind), c.user_id, c.subscription_id) for c in self.changes]
                raise TimeoutError(f"change feed condition not met; seen: {kinds}")
            await self._poll()
        return self.changes

    def of(
        self, kind: IdentityChange.Kind.ValueType, subscription_id: str = ""
    ) -> list[IdentityChange]:
        """The facts of ``kind`` seen so far (about ``subscription_id`` if given)."""
        return [
            c
            for c in self.changes
            if c.kind == kind and (not subscription_id or c.subscription_id == subscription_id)
        ]

    async def wait_for(
        self, kind: IdentityChange.Kind.ValueType, subscription_id: str = "", count: int = 1
    ) -> list[IdentityChange]:
        """Wait until ``count`` facts of ``kind`` (about ``subscription_id``) arrived."""
        await self.until(lambda _: len(self.of(kind, subscription_id)) >= count)
        return self.of(kind, subscription_id)

    async def about(
        self, user_ids: Iterable[str], count: int, *, within: float = 20.0
    ) -> list[IdentityChange]:
        """The facts about ``user_ids`` once at least ``count`` of them arrived."""
        wanted = set(user_ids)

        def found(changes: list[IdentityChange]) -> list[IdentityChange]:
            return [c for c in changes if c.user_id in wanted]

        return found(await self.until(lambda changes: len(found(changes)) >= count, within))
