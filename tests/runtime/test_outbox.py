"""The transactional outbox and its relay, against the real database and broker.

Every test checks the topic as a read_committed consumer would see it: each row exactly once,
none skipped, and one key's rows in the order they were written.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import signal
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import IO

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from tidings.events.v1.identity_change_pb2 import IdentityChange
from tidings.events.v1.tracked_event_pb2 import TrackedEvent

from services.runtime.db import create_pool
from services.runtime.kafka import HEADER_EVENT_TYPE, Topic
from services.runtime.migrations import RUNTIME_MIGRATIONS, migrate
from services.runtime.outbox import (
    HEADER_OUTBOX_ID,
    RELAY_LOCK_KEY,
    OutboxError,
    OutboxRelay,
    enqueue,
    enqueue_many,
)
from tests.conftest import create_topic, temporary_database, unique_name
from tests.polling import eventually
from tests.runtime.kafka_helpers import partitions_of, read_all

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Unclosed aiokafka clients report themselves from ``__del__``: make that happen while the
    suite's loop-error check still listens."""
    yield
    gc.collect()


@pytest.fixture
async def dsn(scratch_db: str) -> str:
    await migrate(scratch_db, [RUNTIME_MIGRATIONS])
    return scratch_db


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(dsn, min_size=2, max_size=24)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def topic(scratch_topic: str) -> Topic[TrackedEvent]:
    return Topic(scratch_topic, TrackedEvent, partitions=3)


@pytest.fixture
def service() -> str:
    return unique_name("svc")


def make_event(writer: int, seq: int) -> TrackedEvent:
    return TrackedEvent(event_id=f"w{writer}-{seq}", app_id="app", user_id=f"user-{writer}")


async def write_concurrently(
    pool: asyncpg.Pool,
    topic: Topic[TrackedEvent],
    *,
    writers: int = 20,
    per_writer: int = 100,
    max_delay: float = 0.005,
    until: asyncio.Event | None = None,
) -> list[TrackedEvent]:
    """Each writer adds its rows one transaction at a time, pausing between insert and commit.

    The pause makes commits land out of id order: a writer's row gets its id, others insert and
    commit later ids, then it commits. Each writer is one user, so its rows must arrive in order.
    Writers stop after ``per_writer`` rows, or earlier once ``until`` is set.
    """
    written: list[TrackedEvent] = []

    async def writer(number: int) -> None:
        for seq in range(per_writer):
            if until is not None and until.is_set():
                return
            message = make_event(number, seq)
            async with pool.acquire() as conn, conn.transaction():
                await enqueue(conn, topic, message.user_id, message)
                await asyncio.sleep(random.uniform(0, max_delay))
            written.append(message)

    await asyncio.gather(*(writer(number) for number in range(writers)))
    return written


async def outbox_size(pool: asyncpg.Pool) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM outbox")
    return count


async def drained(pool: asyncpg.Pool) -> None:
    async def empty() -> bool:
        return await outbox_size(pool) == 0

    await eventually(empty, within=30, what="outbox drained")


async def assert_exactly_once_in_order(
    bootstrap: str, topic: Topic[TrackedEvent], expected: Sequence[TrackedEvent]
) -> int:
    """Assert what a read_committed consumer sees; returns how often Kafka order differs from id
    order across keys (evidence that rows committed out of id order)."""
    records = await read_all(bootstrap, topic.name)
    events = [topic.decode(record.value or b"") for record in records]

    counts = Counter(event.event_id for event in events)
    duplicates = {event_id: n for event_id, n in counts.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} rows published more than once: {duplicates}"
    missing = {event.event_id for event in expected} - set(counts)
    assert not missing, f"{len(missing)} rows never published: {sorted(missing)[:10]}"
    assert len(events) == len(expected)

    per_key: dict[str, list[int]] = defaultdict(list)
    inversions = 0
    last_id_in_partition: dict[int, int] = {}
    for record, event in zip(records, events, strict=True):
        headers = dict(record.headers)
        assert headers[HEADER_EVENT_TYPE] == b"tidings.events.v1.TrackedEvent"
        outbox_id = int(headers[HEADER_OUTBOX_ID])
        if outbox_id < last_id_in_partition.get(record.partition, 0):
            inversions += 1
        last_id_in_partition[record.partition] = outbox_id
        assert record.key is not None
        assert record.key.decode() == event.user_id
        per_key[event.user_id].append(int(event.event_id.split("-")[1]))
    for user, seqs in per_key.items():
        assert seqs == sorted(seqs), f"{user}'s rows out of order"
    return inversions


async def test_enqueue_needs_the_callers_transaction(
    pool: asyncpg.Pool, topic: Topic[TrackedEvent]
) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(OutboxError, match="transaction"):
            await enqueue(conn, topic, "u", make_event(0, 0))
        with pytest.raises(OutboxError, match="transaction"):
            await enqueue_many(conn, topic, [("u", make_event(0, 0))])
        # Rolled back with the caller's transaction: never published.
        with pytest.raises(ZeroDivisionError):  # noqa: PT012 - the failure is inside the block
            async with conn.transaction():
                await enqueue(conn, topic, "u", make_event(0, 0))
                _ = 1 / 0
    assert await outbox_size(pool) == 0


async def test_concurrent_writers_committing_out_of_order_are_all_published_once(
    pool: asyncpg.Pool, kafka_bootstrap: str, topic: Topic[TrackedEvent], service: str
) -> None:
    relay = OutboxRelay(pool, kafka_bootstrap, service=service)
    running = asyncio.create_task(relay.run())
    try:
        expected = await write_concurrently(pool, topic)
        await drained(pool)
    finally:
        await relay.stop()
        await running

    inversions = await assert_exactly_once_in_order(kafka_bootstrap, topic, expected)
    # The scenario that breaks a "highest id seen" relay did happen.
    assert inversions > 0


async def test_enqueue_many_keeps_order_headers_and_topics(
    pool: asyncpg.Pool, kafka_bootstrap: str, topic: Topic[TrackedEvent], service: str
) -> None:
    changes = Topic(unique_name("changes").replace("_", "."), IdentityChange, partitions=1)
    await create_topic(changes.name, partitions=1)
    events = [make_event(1, seq) for seq in range(300)]
    async with pool.acquire() as conn, conn.transaction():
        await enqueue_many(
            conn, topic, [(e.user_id, e) for e in events], headers=[("trace", b"t-9")]
        )
        await enqueue(conn, changes, "user-1", IdentityChange(event_id="c1"), headers=[("a", b"1")])

    relay = OutboxRelay(pool, kafka_bootstrap, service=service, batch_size=128)
    running = asyncio.create_task(relay.run())
    try:
        await drained(pool)
    finally:
        await relay.stop()
        await running

    await assert_exactly_once_in_order(kafka_bootstrap, topic, events)
    records = await read_all(kafka_bootstrap, topic.name)
    assert all(dict(r.headers)["trace"] == b"t-9" for r in records)
    # One statement assigned ids in item order.
    ids = [int(dict(r.headers)[HEADER_OUTBOX_ID]) for r in records]
    assert ids == list(range(ids[0], ids[0] + 300))

    (change,) = await read_all(kafka_bootstrap, changes.name)
    assert IdentityChange.FromString(change.value or b"").event_id == "c1"
    assert dict(change.headers)["a"] == b"1"
    assert dict(change.headers)[HEADER_EVENT_TYPE] == b"tidings.events.v1.IdentityChange"


async def test_commit_to_kafka_latency_is_well_under_a_second(
    pool: asyncpg.Pool, kafka_bootstrap: str, topic: Topic[TrackedEvent], service: str
) -> None:
    # A long idle poll: only the NOTIFY at commit can make this fast.
    relay = OutboxRelay(pool, kafka_bootstrap, service=service, idle_wait=5.0)
    running = asyncio.create_task(relay.run())
    tps = [TopicPartition(topic.name, p) for p in await partitions_of(kafka_bootstrap, topic.name)]
    # From the start of the fresh topic: a consumer resetting to "latest" resolves its position
    # lazily, and when the broker answers NotLeaderForPartition for a just-created partition,
    # that can happen after the first record was published, which it would then skip.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    latencies: list[float] = []
    try:
        consumer.assign(tps)
        await eventually(lambda: relay.is_leader, what="relay leads")
        for seq in range(10):
            async with pool.acquire() as conn, conn.transaction():
                await enqueue(conn, topic, "user-1", make_event(1, seq))
            committed = time.perf_counter()
            batch = await consumer.getmany(timeout_ms=5000)
            latencies.append(time.perf_counter() - committed)
            assert sum(len(records) for records in batch.values()) == 1
    finally:
        await consumer.stop()
        await relay.stop()
        await running
    print(f"commit-to-consumer latency: median {statistics.median(latencies) * 1000:.1f} ms")
    assert statistics.median(latencies) < 0.5


async def test_two_relays_elect_one_leader_and_fail_over(
    dsn: str, pool: asyncpg.Pool, kafka_bootstrap: str, topic: Topic[TrackedEvent], service: str
) -> None:
    # Two "replicas", each with its own pool.
    other_pool = await create_pool(dsn, min_size=1, max_size=4)
    relays = [
        OutboxRelay(p, kafka_bootstrap, service=service, batch_size=50, standby_retry=0.05)
        for p in (pool, other_pool)
    ]
    running = [asyncio.create_task(relay.run()) for relay in relays]
    overlaps = 0
    leaders_seen: set[int] = set()

    async def watch() -> None:
        nonlocal overlaps
        while True:
            leading = [i for i, relay in enumerate(relays) if relay.is_leader]
            overlaps += len(leading) > 1
            leaders_seen.update(leading)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    enough = asyncio.Event()
    writing = asyncio.create_task(
        write_concurrently(
            pool, topic, writers=10, per_writer=100_000, max_delay=0.02, until=enough
        )
    )
    try:
        await eventually(lambda: any(r.is_leader for r in relays), what="a leader")
        first = next(i for i, r in enumerate(relays) if r.is_leader)
        await asyncio.sleep(random.uniform(0.1, 0.4))  # a random moment, not a wait
        # The leader goes away mid-stream (a rolling deploy); the standby must take over.
        await relays[first].stop()
        await running[first]
        other = 1 - first
        await eventually(lambda: relays[other].is_leader, what="the standby takes over")
        # ...and publishes what is written after the failover too.
        await asyncio.sleep(random.uniform(0.1, 0.3))
        enough.set()
        expected = await writing
        await drained(pool)
    finally:
        enough.set()
        await asyncio.gather(writing, return_exceptions=True)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        for relay in relays:
            await relay.stop()
        await asyncio.gather(*running)
        await other_pool.close()

    assert overlaps == 0
    assert leaders_seen == {0, 1}
    await assert_exactly_once_in_order(kafka_bootstrap, topic, expected)


class StallingRelay(OutboxRelay):
    """Stalls before committing its second batch until told to go on."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.stalled = asyncio.Event()
        self.go_on = asyncio.Event()
        self.batches = 0

    async def _before_kafka_commit(self, ids: Sequence[int]) -> None:
        self.batches += 1
        if self.batches == 2:
            self.stalled.set()
            await self.go_on.wait()


async def relay_lock_holder(pool: asyncpg.Pool) -> int | None:
    """Server pid of the session holding the relay lock of this database."""
    pid: int | None = await pool.fetchval(
        """
        SELECT pid FROM pg_locks
        WHERE locktype = 'advisory' AND granted AND objsubid = 1
          AND classid = $1 AND objid = $2
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
        """,
        RELAY_LOCK_KEY >> 32,
        RELAY_LOCK_KEY & 0xFFFFFFFF,
    )
    return pid


async def test_zombie_leader_is_fenced_and_its_batch_published_once(
    dsn: str, pool: asyncpg.Pool, kafka_bootstrap: str, topic: Topic[TrackedEvent], service: str
) -> None:
    zombie = StallingRelay(pool, kafka_bootstrap, service=service, batch_size=50)
    zombie_running = asyncio.create_task(zombie.run())
    other_pool = await create_pool(dsn, min_size=1, max_size=4)
    successor = OutboxRelay(other_pool, kafka_bootstrap, service=service, standby_retry=0.05)
    successor_running: asyncio.Task[None] | None = None
    try:
        await eventually(lambda: zombie.is_leader, what="first relay leads")
        expected = [make_event(w, s) for w in range(4) for s in range(50)]
        async with pool.acquire() as conn, conn.transaction():
            await enqueue_many(conn, topic, [(e.user_id, e) for e in expected])
        # Batch 2 is on the broker, uncommitted, when the leader loses its database session
        # (a network partition): it does not know yet, and will try to commit later.
        await asyncio.wait_for(zombie.stalled.wait(), 10)
        successor_running = asyncio.create_task(successor.run())
        pid = await relay_lock_holder(pool)
        assert pid is not None
        await pool.execute("SELECT pg_terminate_backend($1)", pid)
        await eventually(lambda: successor.is_leader, what="the standby takes over")
        await drained(pool)
        # The zombie wakes up and commits: the broker refuses, its batch stays aborted.
        zombie.go_on.set()
        await eventually(lambda: not zombie.is_leader, what="the zombie steps down")
    finally:
        zombie.go_on.set()
        await zombie.stop()
        await successor.stop()
        await zombie_running
        if successor_running is not None:
            await successor_running
        await other_pool.close()

    await assert_exactly_once_in_order(kafka_bootstrap, topic, expected)


class RelayProcess:
    """``tests/runtime/relay_main.py`` as a child process, logging to a file."""

    def __init__(self, process: asyncio.subprocess.Process, log: IO[bytes], path: Path) -> None:
        self.process = process
        self.log = log
        self.path = path

    @classmethod
    async def start(cls, log_dir: Path, *args: str) -> RelayProcess:
        path = log_dir / f"relay-{unique_name('p')}.log"
        log = path.open("wb")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.runtime.relay_main",
            *args,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'gen'}"},
            stdout=log,
            stderr=log,
        )
        return cls(process, log, path)

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self.wait()

    async def terminate(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await self.wait()

    async def wait(self) -> int:
        code = await self.process.wait()
        self.log.close()
        return code

    def output(self) -> str:
        return self.path.read_text(errors="replace")


async def published(bootstrap: str, topic: str) -> int:
    """Sum of the topic's last stable offsets: grows with each committed batch."""
    tps = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic)]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await consumer.start()
    try:
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


async def test_relay_killed_at_random_moments_still_publishes_exactly_once(
    dsn: str,
    pool: asyncpg.Pool,
    kafka_bootstrap: str,
    topic: Topic[TrackedEvent],
    service: str,
    tmp_path: Path,
) -> None:
    args = (dsn, kafka_bootstrap, service, "--batch-size", "40")
    relays = [await RelayProcess.start(tmp_path, *args)]
    enough = asyncio.Event()
    writing = asyncio.create_task(
        write_concurrently(
            pool, topic, writers=20, per_writer=100_000, max_delay=0.04, until=enough
        )
    )
    try:
        for _ in range(3):
            before = await published(kafka_bootstrap, topic.name)

            async def progressed(baseline: int = before) -> bool:
                return await published(kafka_bootstrap, topic.name) > baseline

            await eventually(progressed, what="the relay publishes")
            await asyncio.sleep(random.uniform(0, 0.3))  # a random moment, not a wait
            assert not writing.done()
            await relays[-1].kill()
            relays.append(await RelayProcess.start(tmp_path, *args))
        enough.set()
        expected = await writing
        await drained(pool)
        assert await relays[-1].terminate() == 0
    except BaseException:
        enough.set()
        await asyncio.gather(writing, return_exceptions=True)
        for relay in relays:
            await relay.kill()
            print(f"--- {relay.path.name}\n{relay.output()}")
        raise

    await assert_exactly_once_in_order(kafka_bootstrap, topic, expected)


async def test_relay_dying_between_kafka_commit_and_delete_does_not_duplicate(
    dsn: str,
    pool: asyncpg.Pool,
    kafka_bootstrap: str,
    topic: Topic[TrackedEvent],
    service: str,
    tmp_path: Path,
) -> None:
    expected = [make_event(w, s) for w in range(5) for s in range(100)]
    async with pool.acquire() as conn, conn.transaction():
        await enqueue_many(conn, topic, [(e.user_id, e) for e in expected])

    # Dies right after committing its second batch of 50 to Kafka, before deleting it.
    crashing = await RelayProcess.start(
        tmp_path,
        *(dsn, kafka_bootstrap, service, "--batch-size", "50", "--crash-after-commits", "2"),
    )
    assert await crashing.wait() == -signal.SIGKILL, crashing.output()
    assert await outbox_size(pool) == 450  # batch 1 deleted; batch 2 in Kafka but not deleted

    relay = await RelayProcess.start(tmp_path, dsn, kafka_bootstrap, service)
    try:
        await drained(pool)
        assert await relay.terminate() == 0
    except BaseException:
        await relay.kill()
        print(relay.output())
        raise

    await assert_exactly_once_in_order(kafka_bootstrap, topic, expected)


@pytest.fixture
async def second_dsn() -> AsyncIterator[str]:
    """Another fresh, migrated database (like ``scratch_db``)."""
    async with temporary_database() as dsn:
        await migrate(dsn, [RUNTIME_MIGRATIONS])
        yield dsn


async def relay_until_drained(pool: asyncpg.Pool, bootstrap: str, service: str) -> None:
    relay = OutboxRelay(pool, bootstrap, service=service)
    running = asyncio.create_task(relay.run())
    try:
        await drained(pool)
    finally:
        await relay.stop()
        await running


async def test_recreated_database_does_not_trust_its_predecessors_progress(
    pool: asyncpg.Pool,
    second_dsn: str,
    kafka_bootstrap: str,
    topic: Topic[TrackedEvent],
    service: str,
) -> None:
    # The same service, its database recreated (a reset dev stack, the next e2e run): outbox
    # ids start at 1 again, and the old database's last marker lists exactly those ids.
    first = [make_event(0, seq) for seq in range(100)]
    async with pool.acquire() as conn, conn.transaction():
        await enqueue_many(conn, topic, [(e.user_id, e) for e in first])
    await relay_until_drained(pool, kafka_bootstrap, service)

    second = [make_event(1, seq) for seq in range(100)]
    second_pool = await create_pool(second_dsn, min_size=1, max_size=4)
    try:
        async with second_pool.acquire() as conn, conn.transaction():
            await enqueue_many(conn, topic, [(e.user_id, e) for e in second])
        assert await second_pool.fetchval("SELECT min(id) FROM outbox") == 1
        await relay_until_drained(second_pool, kafka_bootstrap, service)
    finally:
        await second_pool.close()

    await assert_exactly_once_in_order(kafka_bootstrap, topic, first + second)
