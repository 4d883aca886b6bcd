"""Helpers of the subscription, login and receipt tests: tokens, error details, the change feed.

Tokens are random so every test registers its own; the change feed reads ``identity.changes``
from the moment it starts, keeping only one app's facts, so a test can wait (with a deadline,
never a fixed sleep) for the facts its calls published through the outbox.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import cast

import grpc
import grpc.aio
from aiokafka import AIOKafkaConsumer, TopicPartition
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tidings.events.v1.identity_change_pb2 import IdentityChange
from tidings.identity.v1 import identity_service_pb2 as pb
from tidings.identity.v1 import subscription_pb2 as spb
from tidings.identity.v1.user_ref_pb2 import UserRef

from services.identity.subscriptions_store import DeviceInfo, OptIn, Subscription, SubscriptionType
from services.runtime.kafka import IDENTITY_CHANGES
from tests.conftest import KAFKA_BOOTSTRAP

Kind = IdentityChange.Kind

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
    subscription: spb.Subscription, user: UserRef | None = None
) -> pb.CreateSubscriptionRequest:
    """A CreateSubscription request."""
    return pb.CreateSubscriptionRequest(subscription=subscription, user=user)


def by_user_id(user_id: str) -> UserRef:
    """A ref by Tidings' user id."""
    return UserRef(user_id=user_id)


async def failure(call: object) -> grpc.aio.AioRpcError:
    """Await a call that must fail, and return its error."""
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the call succeeded, but it should have failed")


def reason_of(error: grpc.aio.AioRpcError) -> str:
    """The ``ErrorInfo.reason`` of a failed call."""
    status = rpc_status.from_call(cast(grpc.Call, error))
    assert status is not None, f"no rich status on {error.code()}: {error.details()}"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    raise AssertionError("no ErrorInfo")


def bad_fields(error: grpc.aio.AioRpcError) -> set[str]:
    """The fields a failed call's ``BadRequest`` names."""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    status = rpc_status.from_call(cast(grpc.Call, error))
    assert status is not None
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return {violation.field for violation in bad.field_violations}
    raise AssertionError("no BadRequest")


class ChangeFeed:
    """The facts one app's calls put on ``identity.changes`` since the feed started."""

    def __init__(self, consumer: AIOKafkaConsumer, app_id: str) -> None:
        self._consumer = consumer
        self._app_id = app_id
        self.changes: list[IdentityChange] = []

    async def _poll(self) -> None:
        batches = await self._consumer.getmany(timeout_ms=200)
        for records in batches.values():
            for record in records:
                change = IDENTITY_CHANGES.decode(record.value)
                if change.app_id == self._app_id:
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


@asynccontextmanager
async def change_feed(app_id: str) -> AsyncIterator[ChangeFeed]:
    """A :class:`ChangeFeed` positioned at the current end of every partition."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=KAFKA_BOOTSTRAP,
        isolation_level="read_committed",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    try:
        # The topic is created with this many partitions (partitions_for_topic knows only the
        # topics a consumer subscribed to, and this one assigns).
        partitions = [
            TopicPartition(IDENTITY_CHANGES.name, p) for p in range(IDENTITY_CHANGES.partitions)
        ]
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        # seek_to_end is lazy: resolve the positions now, before the test acts.
        await asyncio.gather(*(consumer.position(tp) for tp in partitions))
        yield ChangeFeed(consumer, app_id)
    finally:
        await consumer.stop()


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
