"""Kafka ceiling: a bare aiokafka producer to a bare consumer in another process.

The consumer runs in a child process, like a downstream service does, so producer and consumer
each have an interpreter of their own (the broker shares the same two cores) instead of one
event loop timesharing between them, which would measure one Python thread rather than Kafka.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer

from bench.ceiling.child import read_line, start_child, stop_child
from bench.context import Context
from bench.figure import Figure
from bench.registry import benchmark

MESSAGE_BYTES = 200
PARTITIONS = 12
#: Distinct keys, like user ids: messages spread over every partition, each key in order.
KEYS = 10_000
READY_TIMEOUT_S = 60.0
DONE_TIMEOUT_S = 300.0


def _producer(bootstrap: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        # The project's delivery guarantees: acknowledged by all replicas, no duplicates.
        acks="all",
        enable_idempotence=True,
        # A few ms of lingering and 256 KiB batches amortise requests without hurting latency;
        # aiokafka's default of 16 KiB caps a batch at ~70 of these messages.
        linger_ms=5,
        max_batch_size=256 * 1024,
    )


async def _warm_up(producer: AIOKafkaProducer, topic: str) -> set[int]:
    """Writes one message to each partition and waits for the acks; returns the partitions.

    A topic just created is in the metadata before its partitions have leaders: the first sends
    get NOT_LEADER_OR_FOLLOWER and are retried. Doing that before the clock starts keeps broker
    start-up out of the figure.
    """
    partitions: set[int] = await producer.partitions_for(topic)
    # Those retries are expected here; aiokafka would log each one as a warning.
    aiokafka_log = logging.getLogger("aiokafka")
    level = aiokafka_log.level
    aiokafka_log.setLevel(logging.ERROR)
    try:
        acks = [await producer.send(topic, b"warm-up", partition=p) for p in sorted(partitions)]
        await asyncio.gather(*acks)
    finally:
        aiokafka_log.setLevel(level)
    return partitions


async def _start_consumer(
    ctx: Context, topic: str, partitions: int, count: int
) -> asyncio.subprocess.Process:
    child = await start_child(
        "bench.ceiling.kafka_consumer",
        ctx.stack.kafka_bootstrap,
        topic,
        str(partitions),
        str(count),
    )
    async with asyncio.timeout(READY_TIMEOUT_S):
        line = await read_line(child)
    if line != "ready":
        raise RuntimeError(f"consumer did not get ready: {line!r}")
    return child


@benchmark("ceiling.kafka_msgs_per_s")
async def kafka_msgs_per_s(ctx: Context) -> list[Figure]:
    """Msgs/s from the first send to the last message consumed (~200 B, 12 partitions).

    Also reports ``ceiling.kafka_produce_msgs_per_s``: first send to last acknowledgement.
    """
    count = ctx.sized(tiny=5_000, full=200_000)
    payload = b"x" * MESSAGE_BYTES
    keys = [f"user-{k:06d}".encode() for k in range(KEYS)]
    async with ctx.scratch_topic(partitions=PARTITIONS) as topic:
        producer = _producer(ctx.stack.kafka_bootstrap)
        await producer.start()
        try:
            partitions = await _warm_up(producer, topic)
            consumer = await _start_consumer(ctx, topic, len(partitions), count)
            try:
                loop = asyncio.get_running_loop()
                first_send = loop.time()
                acks = [
                    await producer.send(topic, payload, key=keys[i % KEYS]) for i in range(count)
                ]
                await asyncio.gather(*acks)
                produced = loop.time() - first_send
                async with asyncio.timeout(DONE_TIMEOUT_S):
                    kind, _, stamp = (await read_line(consumer)).partition(" ")
                if kind != "done":
                    raise RuntimeError(f"unexpected line from the consumer: {kind!r}")
                # The loop clock is time.monotonic(), the clock the child stamps with.
                end_to_end = float(stamp) - first_send
            finally:
                await stop_child(consumer)
        finally:
            await producer.stop()
    ctx.log(f"  {count:,} messages: produced in {produced:.2f} s, consumed by {end_to_end:.2f} s")
    return [
        Figure("ceiling.kafka_msgs_per_s", count / end_to_end, "msgs/s"),
        Figure("ceiling.kafka_produce_msgs_per_s", count / produced, "msgs/s"),
    ]
