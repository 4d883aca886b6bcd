"""Send through the whole pipeline: Send -> outbox -> delivery.requests -> worker -> webhook.

The webhook goes to a local sink, which checks the signature; the message's timeline and the
receipts on delivery.receipts record what happened.
"""

from __future__ import annotations

import json
import time

from tidings.delivery.v1 import channel_pb2, message_pb2
from tidings.events.v1.delivery_receipt_pb2 import DeliveryReceipt

from services.runtime.webhooks import SIGNATURE_HEADER, verify_signature
from tests.delivery.sink import Sink
from tests.delivery.support import (
    SIGNING_SECRET,
    DeliveryHarness,
    ReceiptFeed,
    by_id,
    inline,
    webhook,
)

S = message_pb2
WEBHOOK = channel_pb2.CHANNEL_WEBHOOK


async def test_a_send_reaches_the_webhook_once_signed_and_personalised(
    harness: DeliveryHarness, sink: Sink
) -> None:
    await harness.webhook_channel()
    user = await harness.user(first_name="Ana")
    async with ReceiptFeed(harness.app.app_id) as feed:
        response = await harness.send(
            [by_id(user.user_id)], inline(WEBHOOK, webhook(f"{sink.url}/hook"))
        )
        [result] = response.results
        message = await harness.wait_status(result.message_id, S.MESSAGE_STATUS_SENT)
        await feed.until(lambda _: bool(feed.of(result.message_id, DeliveryReceipt.STATUS_SENT)))

    [request] = sink.received
    assert request.path == "/hook"
    assert json.loads(request.body) == {"hello": "Ana"}
    assert verify_signature(
        SIGNING_SECRET, request.headers[SIGNATURE_HEADER.lower()], request.body, now=time.time()
    )
    assert request.headers["idempotency-key"] == message.idempotency_key
    assert request.headers["x-tidings-message-id"] == result.message_id
    assert message.user_id == user.user_id
    assert message.channel == WEBHOOK
    assert [c.status for c in message.timeline] == [S.MESSAGE_STATUS_QUEUED, S.MESSAGE_STATUS_SENT]
    [receipt] = feed.of(result.message_id, DeliveryReceipt.STATUS_SENT)
    assert receipt.user_id == user.user_id
    assert receipt.channel == "webhook"
    assert receipt.idempotency_key == message.idempotency_key
