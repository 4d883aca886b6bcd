"""Provider answers end to end: retries with backoff honouring Retry-After, failures at once,
dead letters after the last attempt; and Send's idempotency key."""

from __future__ import annotations

import time
from collections import Counter

import grpc
from aiokafka import AIOKafkaConsumer, TopicPartition
from tidings.delivery.v1 import channel_pb2, message_pb2
from tidings.events.v1.dead_letter_pb2 import DeadLetter
from tidings.events.v1.delivery_receipt_pb2 import DeliveryReceipt

from services.runtime.kafka import DEAD_LETTERS
from tests.conftest import KAFKA_BOOTSTRAP
from tests.delivery.sink import Sink, SinkRequest
from tests.delivery.support import DeliveryHarness, ReceiptFeed, by_id, inline, webhook
from tests.identity.support import failure
from tests.runtime.kafka_helpers import partitions_of

S = message_pb2
WEBHOOK = channel_pb2.CHANNEL_WEBHOOK


def _answers(*statuses: int, retry_after: str = "") -> object:
    """A sink script answering ``statuses`` in turn (then 200)."""
    queue = list(statuses)

    def script(_: SinkRequest) -> tuple[int, dict[str, str], bytes] | None:
        if not queue:
            return None
        status = queue.pop(0)
        headers = {"Retry-After": retry_after} if retry_after else {}
        return status, headers, b"{}"

    return script


async def test_5xx_is_retried_with_backoff_until_sent(harness: DeliveryHarness) -> None:
    await harness.webhook_channel()
    user = await harness.user()
    async with Sink(script=_answers(503, 500)) as sink, ReceiptFeed(harness.app.app_id) as feed:  # type: ignore[arg-type]
        [result] = (
            await harness.send([by_id(user.user_id)], inline(WEBHOOK, webhook(f"{sink.url}/x")))
        ).results
        message = await harness.wait_status(result.message_id, S.MESSAGE_STATUS_SENT)
        await feed.until(lambda _: bool(feed.of(result.message_id, DeliveryReceipt.STATUS_SENT)))
    assert message.attempts == 3
    assert sink.count == 3
    assert len({r.headers["idempotency-key"] for r in sink.received}) == 1
    reasons = [(c.status, c.reason) for c in message.timeline]
    assert reasons == [
        (S.MESSAGE_STATUS_QUEUED, ""),
        (S.MESSAGE_STATUS_DEFERRED, "PROVIDER_RETRY"),
        (S.MESSAGE_STATUS_DEFERRED, "PROVIDER_RETRY"),
        (S.MESSAGE_STATUS_SENT, ""),
    ]
    deferred = feed.of(result.message_id, DeliveryReceipt.STATUS_DEFERRED)
    assert len(deferred) == 2
    assert len({r.event_id for r in deferred}) == 2


async def test_retry_after_is_honoured(harness: DeliveryHarness) -> None:
    await harness.webhook_channel()
    user = await harness.user()
    async with Sink(script=_answers(429, retry_after="2")) as sink:  # type: ignore[arg-type]
        [result] = (
            await harness.send([by_id(user.user_id)], inline(WEBHOOK, webhook(f"{sink.url}/x")))
        ).results
        await harness.wait_status(result.message_id, S.MESSAGE_STATUS_SENT, within=20)
    first, second = sink.received
    # The test service's own backoff is at most 1 s: the gap comes from Retry-After.
    assert second.time - first.time >= 1.9


async def test_4xx_fails_at_once(harness: DeliveryHarness) -> None:
    await harness.webhook_channel()
    user = await harness.user()
    async with Sink(script=_answers(422)) as sink:  # type: ignore[arg-type]
        [result] = (
            await harness.send([by_id(user.user_id)], inline(WEBHOOK, webhook(f"{sink.url}/x")))
        ).results
        message = await harness.wait_status(result.message_id, S.MESSAGE_STATUS_FAILED)
    assert sink.count == 1
    assert message.timeline[-1].reason == "PROVIDER_REJECTED"
    assert "HTTP 422" in message.timeline[-1].detail


async def test_retries_end_in_a_dead_letter_with_the_reason(harness: DeliveryHarness) -> None:
    await harness.webhook_channel()
    user = await harness.user()
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA_BOOTSTRAP, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [
            TopicPartition(DEAD_LETTERS.name, p)
            for p in await partitions_of(KAFKA_BOOTSTRAP, DEAD_LETTERS.name)
        ]
        consumer.assign(tps)
        for tp, offset in (await consumer.end_offsets(tps)).items():
            consumer.seek(tp, offset)
        async with Sink(script=lambda _: (503, {}, b"down")) as sink:
            [result] = (
                await harness.send([by_id(user.user_id)], inline(WEBHOOK, webhook(f"{sink.url}/x")))
            ).results
            message = await harness.wait_status(result.message_id, S.MESSAGE_STATUS_FAILED)
        assert sink.count == 5  # TIDINGS_MAX_ATTEMPTS default
        assert message.timeline[-1].reason == "RETRIES_EXHAUSTED"
        letters: list[DeadLetter] = []
        deadline = time.monotonic() + 20
        while not letters and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                for record in records:
                    letter = DEAD_LETTERS.decode(record.value or b"")
                    if (
                        letter.service == "delivery"
                        and result.message_id in str(letter.value) + letter.reason
                    ) or (letter.service == "delivery" and record.key == user.user_id.encode()):
                        letters.append(letter)
        [letter] = letters
        assert letter.source_topic == "delivery.requests"
        assert "RETRIES_EXHAUSTED after 5 attempts" in letter.reason
        assert "HTTP 503" in letter.reason
    finally:
        await consumer.stop()


async def test_the_same_idempotency_key_sends_once(harness: DeliveryHarness, sink: Sink) -> None:
    await harness.webhook_channel()
    user = await harness.user()
    spec = inline(WEBHOOK, webhook(f"{sink.url}/x"))
    first = await harness.send([by_id(user.user_id)], spec, key="order-42-shipped")
    await harness.wait_status(first.results[0].message_id, S.MESSAGE_STATUS_SENT)
    again = await harness.send([by_id(user.user_id)], spec, key="order-42-shipped")
    assert again.replayed
    assert not first.replayed
    assert [r.message_id for r in again.results] == [r.message_id for r in first.results]
    other = await failure(
        harness.send(
            [by_id(user.user_id)], inline(WEBHOOK, webhook(f"{sink.url}/y")), key="order-42-shipped"
        )
    )
    assert (other.code, other.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "IDEMPOTENCY_KEY_REUSED",
    )
    fresh = await harness.send([by_id(user.user_id)], spec, key="order-43-shipped")
    await harness.wait_status(fresh.results[0].message_id, S.MESSAGE_STATUS_SENT)
    assert sink.count == 2
    assert Counter(sink.keys.values()) == Counter({1: 2})


async def test_concurrent_calls_with_one_key_send_once(
    harness: DeliveryHarness, sink: Sink
) -> None:
    import asyncio

    await harness.webhook_channel()
    user = await harness.user()
    spec = inline(WEBHOOK, webhook(f"{sink.url}/x"))
    answers = await asyncio.gather(
        *(harness.send([by_id(user.user_id)], spec, key="race-1") for _ in range(5))
    )
    ids = {a.results[0].message_id for a in answers}
    assert len(ids) == 1
    assert sum(1 for a in answers if not a.replayed) == 1
    await harness.wait_status(ids.pop(), S.MESSAGE_STATUS_SENT)
    assert sink.count == 1
