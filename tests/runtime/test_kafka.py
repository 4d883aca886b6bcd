"""Typed topics, the idempotent producer and the batch consumer against the real local broker."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from tidings.events.v1.dead_letter_pb2 import DeadLetter
from tidings.events.v1.identity_change_pb2 import IdentityChange
from tidings.events.v1.tracked_event_pb2 import TrackedEvent

from services.runtime.kafka import (
    HEADER_EVENT_TYPE,
    BatchConsumer,
    HandlerFailedError,
    KafkaProbe,
    Producer,
    Record,
    Topic,
    ensure_topics,
    kafka_reachable,
)
from tests.conftest import create_topic, unique_name
from tests.polling import eventually
from tests.runtime.kafka_helpers import read_all


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Unclosed aiokafka clients report themselves from ``__del__``: make that happen while the
    suite's loop-error check still listens."""
    yield
    gc.collect()


def event(number: int, user: str) -> TrackedEvent:
    return TrackedEvent(event_id=f"e{number}", app_id="app", user_id=user, name="opened")


class Collector:
    """A handler that records every batch it is given."""

    def __init__(self) -> None:
        self.batches: list[list[Record[TrackedEvent]]] = []

    async def __call__(self, records: Sequence[Record[TrackedEvent]]) -> None:
        self.batches.append(list(records))

    @property
    def records(self) -> list[Record[TrackedEvent]]:
        return [record for batch in self.batches for record in batch]

    def event_ids(self) -> list[str]:
        return [record.value.event_id for record in self.records]


async def consume_until(
    consumer: BatchConsumer[TrackedEvent], done: Collector, count: int
) -> asyncio.Task[None]:
    """Run ``consumer`` in a task until ``done`` saw ``count`` records; returns the task."""
    task = asyncio.create_task(consumer.run())
    await eventually(
        lambda: len(done.records) >= count or task.done(), what=f"{count} records consumed"
    )
    if task.done():
        task.result()  # surface a crash
    return task


async def stop(consumer: BatchConsumer[TrackedEvent], task: asyncio.Task[None]) -> None:
    await consumer.stop()
    await task


async def test_round_trip_of_typed_records(kafka_bootstrap: str, scratch_topic: str) -> None:
    topic = Topic(scratch_topic, TrackedEvent, partitions=3)
    sent = [event(i, f"user-{i % 4}") for i in range(20)]
    async with Producer(kafka_bootstrap, client_id="test") as producer:
        for message in sent[:10]:
            metadata = await producer.send(topic, message.user_id, message, [("trace", b"t-1")])
            assert metadata.topic == scratch_topic
        await producer.send_many(topic, [(m.user_id, m) for m in sent[10:]], [("trace", b"t-1")])

    collector = Collector()
    consumer = BatchConsumer(
        kafka_bootstrap, topic, collector, group_id=unique_name("g"), service="test"
    )
    await stop(consumer, await consume_until(consumer, collector, len(sent)))

    received = collector.records
    assert sorted(r.value.event_id for r in received) == sorted(m.event_id for m in sent)
    assert {r.value.event_id: r.value for r in received} == {m.event_id: m for m in sent}
    for record in received:
        assert record.key == record.value.user_id
        assert record.header("trace") == b"t-1"
        assert record.header(HEADER_EVENT_TYPE) == b"tidings.events.v1.TrackedEvent"
    # One user's records arrive in the order they were sent.
    for user in {m.user_id for m in sent}:
        assert [r.value.event_id for r in received if r.key == user] == [
            m.event_id for m in sent if m.user_id == user
        ]


async def test_offsets_are_committed_only_after_the_handler_returns(
    kafka_bootstrap: str, scratch_topic: str
) -> None:
    topic = Topic(scratch_topic, TrackedEvent, partitions=3)
    group = unique_name("g")
    async with Producer(kafka_bootstrap, client_id="test") as producer:
        await producer.send_many(topic, [("user-1", event(i, "user-1")) for i in range(5)])

        calls = 0

        async def failing(records: Sequence[Record[TrackedEvent]]) -> None:
            nonlocal calls
            calls += 1
            raise RuntimeError("database is down")

        first = BatchConsumer(
            kafka_bootstrap, topic, failing, group_id=group, service="test", retries=0
        )
        with pytest.raises(HandlerFailedError, match="handler failed 1 times") as raised:
            await first.run()
        assert isinstance(raised.value.__cause__, RuntimeError)
        assert calls == 1

        # The next member of the group gets the same records: nothing was committed.
        second_seen = Collector()
        second = BatchConsumer(kafka_bootstrap, topic, second_seen, group_id=group, service="test")
        await stop(second, await consume_until(second, second_seen, 5))
        assert second_seen.event_ids() == [f"e{i}" for i in range(5)]

        # The second one did commit: a third member starts after those five.
        await producer.send(topic, "user-1", event(99, "user-1"))
        third_seen = Collector()
        third = BatchConsumer(kafka_bootstrap, topic, third_seen, group_id=group, service="test")
        await stop(third, await consume_until(third, third_seen, 1))
        assert third_seen.event_ids() == ["e99"]


async def test_failing_batch_is_retried_in_place(kafka_bootstrap: str, scratch_topic: str) -> None:
    topic = Topic(scratch_topic, TrackedEvent, partitions=3)
    async with Producer(kafka_bootstrap, client_id="test") as producer:
        await producer.send_many(topic, [("user-1", event(i, "user-1")) for i in range(3)])

    attempts: list[list[tuple[int, int]]] = []

    async def flaky(records: Sequence[Record[TrackedEvent]]) -> None:
        attempts.append([(r.partition, r.offset) for r in records])
        if len(attempts) == 1:
            raise RuntimeError("transient")

    done = Collector()

    async def handler(records: Sequence[Record[TrackedEvent]]) -> None:
        await flaky(records)
        await done(records)

    consumer = BatchConsumer(
        kafka_bootstrap,
        topic,
        handler,
        group_id=unique_name("g"),
        service="test",
        retries=2,
        retry_backoff=0.01,
    )
    await stop(consumer, await consume_until(consumer, done, 3))
    assert attempts[0] == attempts[1]  # the same batch, handed over again
    assert done.event_ids() == ["e0", "e1", "e2"]


async def test_undecodable_records_go_to_the_dead_letter_topic(
    kafka_bootstrap: str, scratch_topic: str
) -> None:
    topic = Topic(scratch_topic, TrackedEvent, partitions=3)
    dead_letters = Topic(unique_name("dlq").replace("_", "."), DeadLetter, partitions=1)
    await create_topic(dead_letters.name, partitions=1)

    raw = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await raw.start()
    try:
        for key, value in [
            (b"user-1", event(1, "user-1").SerializeToString()),
            (b"user-1", b"not a protobuf"),
            (b"\xff\xfe", event(2, "user-1").SerializeToString()),
            (b"user-1", event(3, "user-1").SerializeToString()),
        ]:
            await raw.send_and_wait(topic.name, value, key=key)
    finally:
        await raw.stop()

    collector = Collector()
    consumer = BatchConsumer(
        kafka_bootstrap,
        topic,
        collector,
        group_id=unique_name("g"),
        service="test-service",
        dead_letters=dead_letters,
    )
    # The bad record does not block its partition: e3 comes after it.
    await stop(consumer, await consume_until(consumer, collector, 2))
    assert collector.event_ids() == ["e1", "e3"]

    letters = [
        DeadLetter.FromString(r.value or b"")
        for r in await read_all(kafka_bootstrap, dead_letters.name)
    ]
    assert len(letters) == 2
    by_value = {letter.value: letter for letter in letters}
    bad_value = by_value[b"not a protobuf"]
    assert bad_value.source_topic == topic.name
    assert bad_value.key == b"user-1"
    assert bad_value.service == "test-service"
    assert "not a valid tidings.events.v1.TrackedEvent" in bad_value.reason
    assert bad_value.event_id
    assert bad_value.HasField("occurred_at")
    bad_key = by_value[event(2, "user-1").SerializeToString()]
    assert bad_key.key == b"\xff\xfe"
    assert "key is not UTF-8" in bad_key.reason


async def test_ensure_topics_is_idempotent_and_safe_when_racing(kafka_bootstrap: str) -> None:
    topics: list[Topic[Any]] = [
        Topic(unique_name("a").replace("_", "."), TrackedEvent, partitions=4),
        Topic(unique_name("b").replace("_", "."), IdentityChange, partitions=2),
    ]

    await asyncio.gather(*(ensure_topics(kafka_bootstrap, topics) for _ in range(4)))
    await ensure_topics(kafka_bootstrap, topics)

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([t.name for t in topics])
    finally:
        await admin.close()
    assert {d["topic"]: len(d["partitions"]) for d in described} == {
        topics[0].name: 4,
        topics[1].name: 2,
    }


async def test_kafka_reachable(kafka_bootstrap: str) -> None:
    assert await kafka_reachable(kafka_bootstrap)
    assert not await kafka_reachable("127.0.0.1:1", timeout=2.0)


def test_topic_refuses_another_message_type() -> None:
    topic = Topic("t", TrackedEvent)
    assert topic.decode(topic.encode(event(1, "u"))) == event(1, "u")
    with pytest.raises(TypeError, match=r"carries tidings\.events\.v1\.TrackedEvent"):
        topic.encode(IdentityChange())  # type: ignore[arg-type]


async def test_kafka_probe_keeps_one_client_and_recovers_after_a_failure(
    kafka_bootstrap: str,
) -> None:
    probe = KafkaProbe(kafka_bootstrap)
    try:
        assert await probe.reachable()
        first = probe._admin
        assert await probe.reachable()
        assert probe._admin is first  # no new connection per probe
    finally:
        await probe.close()
    unreachable = KafkaProbe("127.0.0.1:1")
    try:
        assert not await unreachable.reachable(timeout=2.0)
        assert unreachable._admin is None  # dropped, so the next probe starts afresh
    finally:
        await unreachable.close()


async def test_a_member_reports_its_share_of_the_partitions_and_none_while_revoked(
    kafka_bootstrap: str, scratch_topic: str
) -> None:
    topic = Topic(scratch_topic, TrackedEvent)
    group = unique_name("g")
    reports: dict[str, list[tuple[int, int]]] = {"first": [], "second": []}

    def member(name: str) -> BatchConsumer[TrackedEvent]:
        return BatchConsumer(
            kafka_bootstrap,
            topic,
            Collector(),
            group_id=group,
            service="test",
            on_partitions=lambda owned, total: reports[name].append((owned, total)),
        )

    first, second = member("first"), member("second")
    running = [asyncio.create_task(first.run())]
    try:
        await eventually(lambda: reports["first"][-1:] == [(3, 3)], what="the first alone")
        running.append(asyncio.create_task(second.run()))

        def split() -> bool:
            mine, theirs = reports["first"][-1:], reports["second"][-1:]
            return bool(mine and theirs) and mine[0][0] + theirs[0][0] == 3 and mine[0][0] > 0

        await eventually(split, what="the partitions split between the two")
        # In between, the first member owned nothing: a batch it was finishing then did not
        # keep the whole share beside the second.
        after_alone = reports["first"][reports["first"].index((3, 3)) + 1 :]
        assert after_alone[0] == (0, 3), reports
    finally:
        await first.stop()
        await second.stop()
        await asyncio.gather(*running)
