"""Test helpers: read a topic to its end as a read_committed consumer, poll with a deadline."""

from __future__ import annotations

import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord


async def partitions_of(bootstrap: str, topic: str) -> list[int]:
    """The partition numbers of ``topic``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    assert described["error_code"] == 0, f"topic {topic}: {described}"
    return sorted(int(p["partition"]) for p in described["partitions"])


async def read_all(
    bootstrap: str, topic: str, *, within: float = 20.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every committed record of ``topic`` up to its current last stable offset, in no group.

    Records of aborted transactions are skipped (read_committed), so this is exactly what a
    consumer of the topic would ever see of what was committed so far.
    """
    tps = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic)]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + within
        pending = {tp for tp in tps if end[tp] > 0}
        while pending:
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            batch = await consumer.getmany(*pending, timeout_ms=200)
            for part in batch.values():
                records.extend(part)
            for tp in list(pending):
                if await consumer.position(tp) >= end[tp]:
                    pending.discard(tp)
        return records
    finally:
        await consumer.stop()
