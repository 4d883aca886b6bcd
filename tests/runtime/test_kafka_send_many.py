"""``Producer.send_many`` builds its own batches: it must place and order records like ``send``."""

from __future__ import annotations

from collections import defaultdict

from tidings.events.v1.tracked_event_pb2 import TrackedEvent

from services.runtime.kafka import Producer, Topic
from tests.runtime.kafka_helpers import read_all


def event(i: int, user: str, size: int = 0) -> TrackedEvent:
    return TrackedEvent(event_id=f"e-{i}", app_id="app", user_id=user, name="x" * max(1, size))


async def test_send_many_places_keys_like_send_and_keeps_their_order(
    kafka_bootstrap: str, scratch_topic: str
) -> None:
    topic = Topic(scratch_topic, TrackedEvent, partitions=3)
    users = [f"user-{n}" for n in range(30)]
    async with Producer(kafka_bootstrap, client_id="test") as producer:
        # Where the default partitioner puts each key.
        expected = {
            user: (await producer.send(topic, user, event(-1, user))).partition for user in users
        }
        items = [(users[i % len(users)], event(i, users[i % len(users)])) for i in range(300)]
        metadata = await producer.send_many(topic, items)

    assert len(metadata) == len(items)
    offsets_by_partition: dict[int, list[int]] = defaultdict(list)
    for (user, _), meta in zip(items, metadata, strict=True):
        assert meta.partition == expected[user]
        offsets_by_partition[meta.partition].append(meta.offset)
    # Offsets are per record, increasing in the order of ``items`` within a partition.
    for offsets in offsets_by_partition.values():
        assert offsets == sorted(offsets)
        assert len(set(offsets)) == len(offsets)

    records = [r for r in await read_all(kafka_bootstrap, scratch_topic) if r.offset >= 0]
    by_offset = {(r.partition, r.offset): TrackedEvent.FromString(r.value or b"") for r in records}
    for (_, message), meta in zip(items, metadata, strict=True):
        assert by_offset[(meta.partition, meta.offset)] == message


async def test_send_many_splits_what_does_not_fit_one_batch(
    kafka_bootstrap: str, scratch_topic: str
) -> None:
    topic = Topic(scratch_topic, TrackedEvent, partitions=3)
    # 40 records of ~20 KiB for one key fill more than one 256 KiB batch; their order and
    # offsets must hold across the batches.
    items = [("one-user", event(i, "one-user", size=20_000)) for i in range(40)]
    async with Producer(kafka_bootstrap, client_id="test") as producer:
        metadata = await producer.send_many(topic, items)
    offsets = [meta.offset for meta in metadata]
    assert offsets == list(range(offsets[0], offsets[0] + len(items)))
    records = sorted(await read_all(kafka_bootstrap, scratch_topic), key=lambda r: r.offset)
    assert [TrackedEvent.FromString(r.value or b"").event_id for r in records] == [
        m.event_id for _, m in items
    ]
