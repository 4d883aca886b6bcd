"""Where a new consumer group starts: at the records written since its database was created, not
at the beginning of a shared topic's retention; and never moved once it has offsets."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.runtime.kafka import start_new_group_at
from tests.conftest import KAFKA_BOOTSTRAP


async def _committed(topic: str, group: str) -> list[int | None]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=KAFKA_BOOTSTRAP, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        return [await consumer.committed(TopicPartition(topic, p)) for p in range(3)]
    finally:
        await consumer.stop()


async def test_a_new_group_starts_after_the_given_time(scratch_topic: str) -> None:
    created = datetime.now(UTC) - timedelta(minutes=10)
    stamp = int(created.timestamp() * 1000)
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA_BOOTSTRAP)
    await producer.start()
    try:
        # Partition 0: two old records, then one after `since`; partition 1: only old ones.
        for offset_ms in (-60_000, -30_000, 60_000):
            await producer.send_and_wait(
                scratch_topic, b"x", partition=0, timestamp_ms=stamp + offset_ms
            )
        await producer.send_and_wait(scratch_topic, b"x", partition=1, timestamp_ms=stamp - 1)
    finally:
        await producer.stop()
    group = f"test-group-{uuid.uuid4().hex[:8]}"
    await start_new_group_at(KAFKA_BOOTSTRAP, scratch_topic, group, created)
    assert await _committed(scratch_topic, group) == [2, 1, 0]
    # A group with offsets keeps them.
    await start_new_group_at(KAFKA_BOOTSTRAP, scratch_topic, group, created - timedelta(days=1))
    assert await _committed(scratch_topic, group) == [2, 1, 0]
