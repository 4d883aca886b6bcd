"""Child process of the Kafka ceiling: a bare consumer that reads N messages and says when.

Run as ``python -m bench.ceiling.kafka_consumer BOOTSTRAP TOPIC PARTITIONS COUNT``. It prints
``ready`` once it is assigned every partition and positioned at its end, then ``done <t>``
where ``t`` is ``time.monotonic()`` when the last message arrived. ``CLOCK_MONOTONIC`` is one
clock for the whole machine, so the parent can subtract its own send time from it.
"""

from __future__ import annotations

import asyncio
import sys
import time

from aiokafka import AIOKafkaConsumer, TopicPartition

#: How long to wait for all messages before giving up.
CONSUME_TIMEOUT_S = 300.0


async def consume(bootstrap: str, topic: str, partitions: int, count: int) -> float:
    """Reads the next ``count`` messages from every partition of ``topic``.

    It starts at the end of each partition: the parent has written a warm-up message to each
    before starting this process, and only what comes after them is counted.

    No consumer group: partitions are assigned by hand, so no rebalance delay is measured.

    Args:
        bootstrap: Kafka bootstrap servers.
        topic: The topic; the parent has already seen it in the broker's metadata.
        partitions: Its partition count.
        count: How many messages to wait for.

    Returns:
        ``time.monotonic()`` when the last of them arrived.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        assigned = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(assigned)
        await consumer.seek_to_end(*assigned)
        for tp in assigned:
            await consumer.position(tp)  # resolves the offset now, not on the first fetch
        print("ready", flush=True)
        received = 0
        async with asyncio.timeout(CONSUME_TIMEOUT_S):
            while received < count:
                batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
                received += sum(len(messages) for messages in batches.values())
        return time.monotonic()
    finally:
        await consumer.stop()


def main(argv: list[str]) -> int:
    """Runs the consumer.

    Args:
        argv: ``[BOOTSTRAP, TOPIC, PARTITIONS, COUNT]``.

    Returns:
        Exit status.
    """
    bootstrap, topic, partitions, count = argv[0], argv[1], int(argv[2]), int(argv[3])
    last = asyncio.run(consume(bootstrap, topic, partitions, count))
    print(f"done {last:.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
