"""In-app messages: rendered by the worker, fetched by the SDK of the device they went to
(client key, its own subscription only), gone once displayed/clicked/dismissed or expired;
each report a timeline entry and a receipt."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
from google.protobuf import duration_pb2
from tidings.delivery.v1 import channel_pb2, message_pb2, template_pb2
from tidings.delivery.v1 import delivery_service_pb2 as dpb
from tidings.events.v1.delivery_receipt_pb2 import DeliveryReceipt
from tidings.identity.v1 import subscription_pb2 as spb

from tests.delivery.support import DeliveryHarness, ReceiptFeed, by_id, code_of, inline
from tests.identity.conftest import ADMIN, create_test_app
from tests.identity.support import failure

S = message_pb2
IN_APP = channel_pb2.CHANNEL_IN_APP


def _content(title: str = "Hi {{ user.first_name }}") -> template_pb2.MessageContent:
    return template_pb2.MessageContent(
        in_app=template_pb2.InAppContent(
            title=title,
            body="{{ data.percent | default: 10 }}% off today",
            buttons=[
                template_pb2.InAppButton(
                    label="Shop", url="app://sale/{{ data.percent | default: 10 }}"
                )
            ],
        )
    )


async def _device(harness: DeliveryHarness) -> tuple[str, str]:
    """A user with an iOS device that never allowed push notifications."""
    user = await harness.user(first_name="Ana")
    device = await harness.subscribe(
        user.user_id, spb.SUBSCRIPTION_TYPE_IOS_PUSH, uuid.uuid4().hex * 2, opted_in=False
    )
    return user.user_id, device.subscription_id


async def _pending(
    harness: DeliveryHarness, subscription_id: str, metadata: object = None
) -> list[message_pb2.InAppMessage]:
    answer = await harness.delivery.ListInAppMessages(
        dpb.ListInAppMessagesRequest(subscription_id=subscription_id),
        metadata=metadata or harness.client,
    )
    return list(answer.messages)


async def _report(
    harness: DeliveryHarness, message_id: str, subscription_id: str, kind: int
) -> int:
    answer = await harness.delivery.ReportEngagement(
        dpb.ReportEngagementRequest(
            message_id=message_id,
            subscription_id=subscription_id,
            kind=kind,  # type: ignore[arg-type]
        ),
        metadata=harness.client,
    )
    return answer.status  # type: ignore[no-any-return]


async def test_the_sdk_fetches_its_in_app_messages_and_reports_them(
    harness: DeliveryHarness,
) -> None:
    user_id, device = await _device(harness)
    spec = inline(IN_APP, _content())
    spec.data.update({"percent": 20})
    async with ReceiptFeed(harness.app.app_id) as feed:
        ids = [(await harness.send([by_id(user_id)], spec)).results[0].message_id for _ in "ab"]
        for message_id in ids:
            sent = await harness.wait_status(message_id, S.MESSAGE_STATUS_SENT)
            assert (sent.channel, sent.subscription_id) == (IN_APP, device)
        pending = await _pending(harness, device)
        assert [m.message_id for m in pending] == ids  # oldest first
        shown = pending[0].content
        assert (shown.title, shown.body) == ("Hi Ana", "20% off today")
        assert [(b.label, b.url) for b in shown.buttons] == [("Shop", "app://sale/20")]

        assert await _report(harness, ids[0], device, dpb.ENGAGEMENT_KIND_DISPLAYED) == (
            S.MESSAGE_STATUS_OPENED
        )
        assert await _report(harness, ids[0], device, dpb.ENGAGEMENT_KIND_CLICKED) == (
            S.MESSAGE_STATUS_CLICKED
        )
        assert await _report(harness, ids[1], device, dpb.ENGAGEMENT_KIND_DISMISSED) == (
            S.MESSAGE_STATUS_DISMISSED
        )
        assert await _pending(harness, device) == []
        await feed.until(lambda _: bool(feed.of(ids[1], DeliveryReceipt.STATUS_DISMISSED)))
        await feed.until(lambda _: bool(feed.of(ids[0], DeliveryReceipt.STATUS_CLICKED)))
    assert [r.status for r in feed.of(ids[0])] == [
        DeliveryReceipt.STATUS_SENT,
        DeliveryReceipt.STATUS_OPENED,
        DeliveryReceipt.STATUS_CLICKED,
    ]
    [dismissed] = feed.of(ids[1], DeliveryReceipt.STATUS_DISMISSED)
    assert (dismissed.channel, dismissed.subscription_id) == ("in_app", device)


async def test_only_its_own_subscription_and_app(
    harness: DeliveryHarness, apps_stub: object
) -> None:
    user_id, device = await _device(harness)
    other_user, other_device = await _device(harness)
    [result] = (await harness.send([by_id(user_id)], inline(IN_APP, _content("x")))).results
    await harness.wait_status(result.message_id, S.MESSAGE_STATUS_SENT)
    assert [m.message_id for m in await _pending(harness, device)] == [result.message_id]
    assert [m.message_id for m in await _pending(harness, device, harness.server)] == [
        result.message_id
    ]
    # Another device of the app, and the same device id asked with another app's client key.
    assert await _pending(harness, other_device) == []
    other_app = await create_test_app(apps_stub)  # type: ignore[arg-type]
    foreign = await failure(_pending(harness, device, other_app.client))
    assert (foreign.code, foreign.reason) == (grpc.StatusCode.NOT_FOUND, "SUBSCRIPTION_NOT_FOUND")
    # Nor may another device report it.
    refused = await failure(
        harness.delivery.ReportEngagement(
            dpb.ReportEngagementRequest(
                message_id=result.message_id,
                subscription_id=other_device,
                kind=dpb.ENGAGEMENT_KIND_DISMISSED,
            ),
            metadata=harness.client,
        )
    )
    assert (refused.code, refused.reason) == (grpc.StatusCode.NOT_FOUND, "MESSAGE_NOT_FOUND")
    bad = await failure(
        harness.delivery.ListInAppMessages(
            dpb.ListInAppMessagesRequest(subscription_id="me", page_size=-1),
            metadata=harness.client,
        )
    )
    assert (bad.code, bad.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["subscription_id"])
    request = dpb.ListInAppMessagesRequest(subscription_id=device)
    assert await code_of(harness.delivery.ListInAppMessages(request)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert await code_of(harness.delivery.ListInAppMessages(request, metadata=ADMIN)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert other_user


async def test_expired_in_app_messages_are_not_shown(harness: DeliveryHarness) -> None:
    user_id, device = await _device(harness)
    spec = inline(IN_APP, _content("soon gone"))
    spec.ttl.CopyFrom(duration_pb2.Duration(seconds=4))
    [result] = (await harness.send([by_id(user_id)], spec)).results
    await harness.wait_status(result.message_id, S.MESSAGE_STATUS_SENT)
    [waiting] = await _pending(harness, device)
    assert waiting.HasField("expire_time")
    await asyncio.sleep(max(0.0, waiting.expire_time.ToNanoseconds() / 1e9 - time.time()) + 0.2)
    assert await _pending(harness, device) == []


async def test_a_user_without_a_device_fails_no_subscription(harness: DeliveryHarness) -> None:
    user = await harness.user()
    await harness.subscribe(user.user_id, spb.SUBSCRIPTION_TYPE_EMAIL, "x@example.com")
    [result] = (await harness.send([by_id(user.user_id)], inline(IN_APP, _content()))).results
    failed = await harness.wait_status(result.message_id, S.MESSAGE_STATUS_FAILED)
    assert failed.timeline[-1].reason == "NO_SUBSCRIPTION"
