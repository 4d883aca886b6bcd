"""Records a journey produces on delivery.requests (template, channels, trigger properties, its
ids): the worker sends them once, however often they are redelivered, and the receipts carry
the journey's key and ids back."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import TYPE_CHECKING

import httpx
from google.protobuf import struct_pb2, timestamp_pb2
from tidings.delivery.v1 import channel_pb2, message_pb2, template_pb2
from tidings.delivery.v1 import delivery_service_pb2 as dpb
from tidings.events.v1.delivery_receipt_pb2 import DeliveryReceipt
from tidings.events.v1.send_request_pb2 import SendRequest
from tidings.identity.v1 import subscription_pb2 as spb

from services.delivery.jobs import derive_message_id
from services.delivery.secrets_box import SecretBox
from services.delivery.tracking import TrackingLinks
from services.runtime.kafka import DELIVERY_REQUESTS, Producer
from tests.conftest import KAFKA_BOOTSTRAP
from tests.delivery.sink import Sink
from tests.delivery.support import TRACKING_SECRET, DeliveryHarness, ReceiptFeed
from tests.identity.conftest import create_test_app

if TYPE_CHECKING:
    from tidings.identity.v1.apps_service_pb2_grpc import AppsServiceAsyncStub


async def test_a_journey_record_is_sent_once_with_its_context(
    harness: DeliveryHarness, sink: Sink
) -> None:
    await harness.webhook_channel()
    template = await harness.delivery.CreateTemplate(
        dpb.CreateTemplateRequest(
            template=template_pb2.Template(
                display_name="cart reminder",
                channel=channel_pb2.CHANNEL_WEBHOOK,
                content=template_pb2.MessageContent(
                    webhook=template_pb2.WebhookContent(
                        url=f"{sink.url}/j",
                        body='{"sku": "{{ event.sku }}", "node": "{{ journey.node_id }}"}',
                    )
                ),
            )
        ),
        metadata=harness.server,
    )
    user = await harness.user()
    key = f"journey-1:node-2:visit-{uuid.uuid4().hex[:6]}"
    properties = struct_pb2.Struct()
    properties.update({"sku": "A-1"})
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    record = SendRequest(
        event_id=str(uuid.uuid4()),
        app_id=harness.app.app_id,
        user_id=user.user_id,
        idempotency_key=key,
        occurred_at=now,
        template_id=template.template_id,
        channels=["webhook"],
        journey_id="journey-1",
        journey_node_id="node-2",
        trigger_properties=properties,
    )
    message_id = str(derive_message_id(harness.app.app_id, key))
    async with (
        Producer(KAFKA_BOOTSTRAP, client_id="test-journey") as producer,
        ReceiptFeed(harness.app.app_id) as feed,
    ):
        for _ in range(3):  # redelivered, or produced again by a retrying engine
            await producer.send(DELIVERY_REQUESTS, user.user_id, record)
        message = await harness.wait_status(message_id, message_pb2.MESSAGE_STATUS_SENT)
        await feed.until(lambda _: bool(feed.of(message_id, DeliveryReceipt.STATUS_SENT)))
    assert message.idempotency_key == key
    assert message.template_id == template.template_id
    assert [json.loads(r.body) for r in sink.received] == [{"sku": "A-1", "node": "node-2"}]
    [receipt] = feed.of(message_id, DeliveryReceipt.STATUS_SENT)
    assert (receipt.idempotency_key, receipt.journey_id, receipt.journey_node_id) == (
        key,
        "journey-1",
        "node-2",
    )


async def test_engagement_receipts_of_a_journey_message_name_the_journey(
    harness: DeliveryHarness, sink: Sink
) -> None:
    """Opens and clicks, from the SDK and from the tracking endpoint, carry the journey ids the
    journey's record had, so a journey waiting on a click matches it by journey and node."""
    await harness.telegram_channel(sink.url)
    template = await harness.delivery.CreateTemplate(
        dpb.CreateTemplateRequest(
            template=template_pb2.Template(
                display_name=f"journey text {uuid.uuid4().hex[:6]}",
                channel=channel_pb2.CHANNEL_TELEGRAM,
                content=template_pb2.MessageContent(
                    text=template_pb2.TextContent(text="Back for {{ event.sku }}?")
                ),
            )
        ),
        metadata=harness.server,
    )
    user = await harness.user()
    subscription = await harness.subscribe(user.user_id, spb.SUBSCRIPTION_TYPE_TELEGRAM, "4242")
    key = f"journey-7:node-wait:visit-{uuid.uuid4().hex[:6]}"
    properties = struct_pb2.Struct()
    properties.update({"sku": "B-2"})
    record = SendRequest(
        event_id=str(uuid.uuid4()),
        app_id=harness.app.app_id,
        user_id=user.user_id,
        idempotency_key=key,
        template_id=template.template_id,
        channels=["telegram"],
        journey_id="journey-7",
        journey_node_id="node-wait",
        trigger_properties=properties,
    )
    message_id = str(derive_message_id(harness.app.app_id, key))
    async with (
        Producer(KAFKA_BOOTSTRAP, client_id="test-journey") as producer,
        ReceiptFeed(harness.app.app_id) as feed,
    ):
        await producer.send(DELIVERY_REQUESTS, user.user_id, record)
        await harness.wait_status(message_id, message_pb2.MESSAGE_STATUS_SENT)
        await harness.delivery.ReportEngagement(
            dpb.ReportEngagementRequest(
                message_id=message_id,
                subscription_id=subscription.subscription_id,
                kind=dpb.ENGAGEMENT_KIND_CLICKED,
                url="app://cart",
            ),
            metadata=harness.client,
        )
        links = TrackingLinks(
            SecretBox(TRACKING_SECRET), f"http://127.0.0.1:{harness.tracking_port}"
        )
        pixel = links.open_url(harness.app.app_id, uuid.UUID(message_id))
        async with httpx.AsyncClient() as client:
            assert (await client.get(pixel)).status_code == 200
        await feed.until(
            lambda _: bool(
                feed.of(message_id, DeliveryReceipt.STATUS_CLICKED)
                and feed.of(message_id, DeliveryReceipt.STATUS_OPENED)
            )
        )
    engaged = feed.of(message_id, DeliveryReceipt.STATUS_CLICKED) + feed.of(
        message_id, DeliveryReceipt.STATUS_OPENED
    )
    assert [(r.journey_id, r.journey_node_id, r.idempotency_key) for r in engaged] == [
        ("journey-7", "node-wait", key)
    ] * 2


async def test_a_record_of_an_app_configured_a_moment_ago_is_sent(
    harness: DeliveryHarness, sink: Sink, apps_stub: AppsServiceAsyncStub
) -> None:
    """A worker skips records of apps its deployment does not know (the topic is shared); an app
    that becomes known must have its next record sent, however soon after a skipped one."""
    user = await harness.user()
    # Another app, known from the start: its record behind the skipped one, on the same
    # partition, shows when the worker has passed the skipped one.
    known = dataclasses.replace(harness, app=await create_test_app(apps_stub))
    await known.webhook_channel()
    known_user = await known.user()

    def record(app_id: str, user_id: str, key: str, url: str) -> SendRequest:
        content = template_pb2.MessageContent(
            webhook=template_pb2.WebhookContent(url=url, body="{}")
        )
        spec = message_pb2.MessageSpec(
            options=[message_pb2.SendOption(channel=channel_pb2.CHANNEL_WEBHOOK, content=content)]
        )
        return SendRequest(
            event_id=str(uuid.uuid4()),
            app_id=app_id,
            user_id=user_id,
            idempotency_key=key,
            spec=spec,
        )

    new_app = f"{sink.url}/new-app"
    async with Producer(KAFKA_BOOTSTRAP, client_id="test-new-app") as producer, Sink() as marks:
        # Not known yet: skipped (it may be another deployment's app).
        before = record(harness.app.app_id, user.user_id, "before-configuration", new_app)
        await producer.send(DELIVERY_REQUESTS, user.user_id, before)
        marker = record(known.app.app_id, known_user.user_id, "marker", f"{marks.url}/marker")
        await producer.send(DELIVERY_REQUESTS, user.user_id, marker)  # same key: same partition
        await known.wait_status(
            str(derive_message_id(known.app.app_id, "marker")), message_pb2.MESSAGE_STATUS_SENT
        )
        await harness.webhook_channel()  # the app is known from now on
        key = "right-after-configuration"
        await producer.send(
            DELIVERY_REQUESTS, user.user_id, record(harness.app.app_id, user.user_id, key, new_app)
        )
        message_id = str(derive_message_id(harness.app.app_id, key))
        message = await harness.wait_status(message_id, message_pb2.MESSAGE_STATUS_SENT)
    assert message.idempotency_key == key
    assert [r.path for r in sink.received] == ["/new-app"]
