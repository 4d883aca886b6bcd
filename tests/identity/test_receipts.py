"""Identity's consumer of ``delivery.receipts``: a dead token disables its subscription, once.

Receipts are produced to the real topic with the runtime's producer, as delivery would; the
identity process's consumer applies them. Whether a receipt that must have no effect was
processed is known from a later *sentinel* receipt on the same partition (same key): once the
sentinel's effect is visible, everything before it was handled.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp
from tidings.events.v1.delivery_receipt_pb2 import DeliveryReceipt
from tidings.identity.v1 import identity_service_pb2 as pb
from tidings.identity.v1 import identity_service_pb2_grpc
from tidings.identity.v1 import subscription_pb2 as spb

from services.runtime.kafka import DELIVERY_RECEIPTS, Producer
from tests.conftest import KAFKA_BOOTSTRAP
from tests.identity.conftest import TestApp
from tests.identity.support import (
    EMAIL,
    IOS,
    ChangeFeed,
    Kind,
    address,
    by_id,
    create,
    ios_token,
    push,
)
from tests.polling import eventually

if TYPE_CHECKING:  # the async stub type exists only in the generated type stubs
    Stub = identity_service_pb2_grpc.IdentityServiceAsyncStub


@pytest.fixture
async def producer() -> AsyncIterator[Producer]:
    async with Producer(KAFKA_BOOTSTRAP, client_id="test-receipts") as started:
        yield started


def receipt(
    subscription: spb.Subscription,
    *,
    app_id: str = "",
    token_invalid: bool = True,
    detail: str = "apns:Unregistered",
    status: DeliveryReceipt.Status.ValueType = DeliveryReceipt.STATUS_FAILED,
    occurred_at: datetime | None = None,
    event_id: str | None = None,
) -> DeliveryReceipt:
    """A receipt about a message sent to ``subscription`` (in ``app_id``)."""
    stamp = Timestamp()
    stamp.FromDatetime(occurred_at or datetime.now(UTC))
    return DeliveryReceipt(
        event_id=event_id or str(uuid.uuid4()),
        app_id=app_id,
        user_id=subscription.user_id,
        message_id=str(uuid.uuid4()),
        status=status,
        occurred_at=stamp,
        subscription_id=subscription.subscription_id,
        token_invalid=token_invalid,
        detail=detail,
    )


async def until_disabled(
    identity_stub: Stub, app: TestApp, subscription_id: str
) -> spb.Subscription:
    """Poll GetSubscription until the subscription is disabled (20 s at most)."""

    async def subscription() -> spb.Subscription:
        return await identity_stub.GetSubscription(
            pb.GetSubscriptionRequest(subscription_id=subscription_id), metadata=app.server
        )

    return await eventually(
        subscription, lambda found: not found.enabled, within=20, what="the receipt applied"
    )


async def send(producer: Producer, key: str, *receipts: DeliveryReceipt) -> None:
    await producer.send_many(DELIVERY_RECEIPTS, [(key, r) for r in receipts])


async def test_a_dead_token_disables_its_subscription_once(
    identity_stub: Stub, app: TestApp, producer: Producer, feed: ChangeFeed
) -> None:
    device = await identity_stub.CreateSubscription(create(push(IOS)), metadata=app.client)
    sentinel = await identity_stub.CreateSubscription(
        create(push(IOS), by_id(device.user_id)), metadata=app.server
    )
    dead = receipt(device, app_id=app.app_id)
    await send(producer, device.user_id, dead, dead)  # delivered twice, as Kafka may

    disabled = await until_disabled(identity_stub, app, device.subscription_id)
    assert disabled.disabled_reason == "apns:Unregistered"
    assert disabled.token == device.token
    assert disabled.user_id == device.user_id

    # An operator turns it back on; a replay of the same receipt must not turn it off again
    # (only the inbox can tell: the subscription is enabled, its token unchanged).
    await identity_stub.UpdateSubscription(
        pb.UpdateSubscriptionRequest(
            subscription=spb.Subscription(subscription_id=device.subscription_id, enabled=True),
            update_mask=FieldMask(paths=["enabled"]),
        ),
        metadata=app.server,
    )
    await send(producer, device.user_id, dead, receipt(sentinel, app_id=app.app_id, detail=""))
    assert (await until_disabled(identity_stub, app, sentinel.subscription_id)).disabled_reason == (
        "token_invalid"
    )
    found = await identity_stub.GetSubscription(
        pb.GetSubscriptionRequest(subscription_id=device.subscription_id), metadata=app.server
    )
    assert found.enabled
    await feed.wait_for(Kind.KIND_SUBSCRIPTION_DEACTIVATED, sentinel.subscription_id)
    [fact] = feed.of(Kind.KIND_SUBSCRIPTION_DEACTIVATED, device.subscription_id)
    assert fact.user_id == device.user_id
    assert not fact.subscription_reachable
    assert list(fact.changed_fields) == ["enabled"]


async def test_receipts_that_do_not_declare_a_token_dead_change_nothing(
    identity_stub: Stub, app: TestApp, other_app: TestApp, producer: Producer
) -> None:
    mail = await identity_stub.CreateSubscription(create(address(EMAIL)), metadata=app.server)
    rotated = await identity_stub.CreateSubscription(
        create(push(IOS), by_id(mail.user_id)), metadata=app.server
    )
    sent_before_rotation = datetime.now(UTC) - timedelta(seconds=1)
    await identity_stub.UpdateSubscription(
        pb.UpdateSubscriptionRequest(
            subscription=spb.Subscription(
                subscription_id=rotated.subscription_id, token=ios_token()
            ),
            update_mask=FieldMask(paths=["token"]),
        ),
        metadata=app.client,
    )
    sentinel = await identity_stub.CreateSubscription(
        create(push(IOS), by_id(mail.user_id)), metadata=app.server
    )
    await send(
        producer,
        mail.user_id,
        # Delivered, opened: nothing to do.
        receipt(
            mail, app_id=app.app_id, token_invalid=False, status=DeliveryReceipt.STATUS_DELIVERED
        ),
        receipt(mail, app_id=app.app_id, token_invalid=False, status=DeliveryReceipt.STATUS_OPENED),
        # Another app's key space: this app's subscription id under another app id.
        receipt(mail, app_id=other_app.app_id),
        # Unknown app, unknown subscription, malformed id, no app.
        receipt(mail, app_id=f"app_{uuid.uuid4().hex}"),
        receipt(spb.Subscription(subscription_id=str(uuid.uuid4())), app_id=app.app_id),
        receipt(spb.Subscription(subscription_id="not-a-uuid"), app_id=app.app_id),
        receipt(mail),
        # About the token before it rotated: stale.
        receipt(rotated, app_id=app.app_id, occurred_at=sent_before_rotation),
        receipt(sentinel, app_id=app.app_id),
    )
    await until_disabled(identity_stub, app, sentinel.subscription_id)
    for subscription in (mail, rotated):
        found = await identity_stub.GetSubscription(
            pb.GetSubscriptionRequest(subscription_id=subscription.subscription_id),
            metadata=app.server,
        )
        assert found.enabled
        assert found.disabled_reason == ""


async def test_presenting_a_dead_token_again_enables_it(
    identity_stub: Stub, app: TestApp, producer: Producer, feed: ChangeFeed
) -> None:
    registration = push(IOS)
    device = await identity_stub.CreateSubscription(create(registration), metadata=app.client)
    await send(producer, device.user_id, receipt(device, app_id=app.app_id))
    await until_disabled(identity_stub, app, device.subscription_id)
    # The app reinstalled on the device registers the same token after the verdict.
    again = await identity_stub.CreateSubscription(create(registration), metadata=app.client)
    assert again.subscription_id == device.subscription_id
    assert (again.enabled, again.disabled_reason) == (True, "")
    facts = await feed.wait_for(Kind.KIND_SUBSCRIPTION_CHANGED, device.subscription_id)
    assert facts[0].subscription_reachable
    assert "enabled" in facts[0].changed_fields
