"""Transactional outbox: facts written with the change they describe, published exactly once.

A service that changes its database and must tell the world writes the fact into the ``outbox``
table in the same transaction (:func:`enqueue`, :func:`enqueue_many`); the :class:`OutboxRelay`
publishes committed rows to Kafka and deletes them::

    async with pool.acquire() as conn, conn.transaction():
        await store.merge_users(conn, ...)
        await outbox.enqueue(conn, IDENTITY_CHANGES, user_id, change)

    relay = OutboxRelay(pool, settings.kafka_bootstrap, service="identity")
    task = asyncio.create_task(relay.run())     # every replica may run one; one leads
    ...
    await relay.stop()

How the relay works, and why:

* **No cursor.** Ids are assigned at insert but become visible at commit, out of order, so a
  relay that remembers "the highest id published" skips rows that commit late. The relay
  publishes whatever rows are in the table (oldest id first) and deletes exactly the ids it
  published; a row that commits late is simply in a later batch.
* **One leader per database.** Replicas elect a leader with ``pg_try_advisory_lock`` held on a
  dedicated connection; standbys retry every ``standby_retry`` seconds. The leader listens on
  the ``tidings_outbox`` channel (an insert trigger notifies at commit) and polls every
  ``idle_wait`` seconds as a fallback, so commit-to-Kafka latency is a few milliseconds.
* **Exactly once on the topic.** The leader publishes with a Kafka transactional producer
  (``transactional_id = tidings-outbox-<service>-<database instance id>``). Per batch: begin;
  send the rows in id order; send a *progress marker* listing the batch's outbox ids to the
  single-partition topic ``tidings.outbox-progress.<service>.<instance id>``; commit; then
  delete the ids from the outbox. A new leader's producer start fences every older
  producer of that id (a zombie's open transaction is aborted and its commit fails), then the
  leader reads its database's last committed marker and deletes those ids: the previous leader
  may have died between the Kafka commit and the delete. Either a
  batch's Kafka transaction committed, and then its rows are deleted before anything else is
  published, or it aborted and the rows are published again; consumers reading with
  ``isolation_level="read_committed"`` (as :class:`~services.runtime.kafka.BatchConsumer` does)
  never see aborted records.
* **Order per key.** Rows are sent in id order, batches one after the other, by one producer,
  so records of one key reach their partition in the order their rows became visible.

The instance id is a random UUID the runtime migration stores in ``outbox_instance``: a
database recreated under the same service name (tests, a reset dev stack) gets a new one, so it
never trusts the markers of its predecessor (whose ids it reuses), and two databases of one
service name on one broker neither fence each other nor share a progress topic.

Every record carries the ``tidings-event-type`` and ``tidings-outbox-id`` headers.

Sharp edges:
    * A row the broker refuses for good (topic missing, record larger than the broker's maximum)
      stops the relay from making progress; it logs the error and retries the batch. Create
      topics at startup (:func:`~services.runtime.kafka.ensure_topics`).
    * A leader killed in the middle of a transaction leaves it open until the next leader starts
      (which aborts it) or :data:`TRANSACTION_TIMEOUT_MS` passes; read_committed consumers of
      the partitions it touched wait that long.
    * Exactly once holds for Kafka; consumers still deduplicate by event id (the inbox), since
      their own processing is at least once.
    * PostgreSQL serialises the commits of transactions that issued ``NOTIFY`` (a
      database-wide lock on the notification queue). Fine at hundreds of outbox-writing commits
      per second; at many thousands, drop the trigger in a migration and rely on ``idle_wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.runtime.db import DataPlaneError, DBConnection, hold_session_state
from services.runtime.kafka import (
    HEADER_EVENT_TYPE,
    Headers,
    KeyPartitioner,
    M,
    Topic,
    TopicSpec,
    create_missing_topics,
    key_partition,
)

__all__ = [
    "HEADER_OUTBOX_ID",
    "NOTIFY_CHANNEL",
    "RELAY_LOCK_KEY",
    "TRANSACTION_TIMEOUT_MS",
    "OutboxError",
    "OutboxRelay",
    "enqueue",
    "enqueue_many",
    "progress_topic",
    "transactional_id",
]

log = logging.getLogger(__name__)

#: Header with the row's outbox id (ASCII decimal); unique per database, increasing per key.
HEADER_OUTBOX_ID = "tidings-outbox-id"
#: Channel the outbox insert trigger notifies (see runtime migration 0001).
NOTIFY_CHANNEL = "tidings_outbox"
#: Advisory lock key of the relay leader ("tdngoutb" as a big-endian int64); locks are per
#: database, so this elects one leader per service database.
RELAY_LOCK_KEY = int.from_bytes(b"tdngoutb", "big")
#: How long the broker keeps a dead leader's transaction open before aborting it itself.
TRANSACTION_TIMEOUT_MS = 10_000

_LIVENESS_INTERVAL = 5.0  # seconds between checks that the lock connection is alive
_RETRY_DELAY = 1.0  # seconds between leadership attempts after an error
_RECOVERY_TIMEOUT = 60.0  # seconds to read the last progress marker

_INSERT_ONE = """
INSERT INTO outbox (topic, key, event_type, payload, header_keys, header_values)
VALUES ($1, $2, $3, $4, $5, $6)
"""

# One statement per batch; ORDER BY keeps ids in the order of the items (per-key order).
_INSERT_MANY = """
INSERT INTO outbox (topic, key, event_type, payload, header_keys, header_values)
SELECT $1, item.key, $2, item.payload, $5, $6
FROM unnest($3::text[], $4::bytea[]) WITH ORDINALITY AS item(key, payload, n)
ORDER BY item.n
"""

_SELECT_BATCH = """
SELECT id, topic, key, event_type, payload, header_keys, header_values
FROM outbox
ORDER BY id
LIMIT $1
"""

_DELETE = "DELETE FROM outbox WHERE id = ANY($1::bigint[])"


class OutboxError(DataPlaneError):
    """The outbox was used wrongly (e.g. outside a transaction) or the relay cannot proceed."""


def transactional_id(service: str, instance: str) -> str:
    """The Kafka transactional id of the relays of ``service``'s database ``instance``."""
    return f"tidings-outbox-{service}-{instance}"


def progress_topic(service: str, instance: str) -> str:
    """The single-partition topic where the relays of a database record the ids they published."""
    return f"tidings.outbox-progress.{service}.{instance}"


def _require_transaction(conn: DBConnection) -> None:
    if not conn.is_in_transaction():
        raise OutboxError(
            "outbox rows must be written in the transaction of the change they describe; "
            "call enqueue inside `async with conn.transaction():`"
        )


async def enqueue(
    conn: DBConnection, topic: Topic[M], key: str, message: M, headers: Headers = ()
) -> None:
    """Add one record to the outbox, in the caller's transaction.

    It is published once that transaction commits, and never if it rolls back.

    Args:
        conn: A connection inside a transaction.
        topic: Destination topic; ``message`` must be of its type.
        key: Record key, the user id.
        message: The payload.
        headers: Extra Kafka headers; the relay adds the event-type and outbox-id headers.

    Raises:
        OutboxError: ``conn`` is not in a transaction.
    """
    _require_transaction(conn)
    await conn.execute(
        _INSERT_ONE,
        topic.name,
        key,
        topic.event_type,
        topic.encode(message),
        [name for name, _ in headers],
        [value for _, value in headers],
    )


async def enqueue_many(
    conn: DBConnection,
    topic: Topic[M],
    items: Sequence[tuple[str, M]],
    headers: Headers = (),
) -> None:
    """Add ``(key, message)`` records to the outbox with one statement, in the caller's transaction.

    Records keep the order of ``items`` (per key, that is the order consumers see).

    Args:
        conn: A connection inside a transaction.
        topic: Destination topic of every item.
        items: ``(key, message)`` pairs.
        headers: Extra Kafka headers put on every record.

    Raises:
        OutboxError: ``conn`` is not in a transaction.
    """
    if not items:
        return
    _require_transaction(conn)
    await conn.execute(
        _INSERT_MANY,
        topic.name,
        topic.event_type,
        [key for key, _ in items],
        [topic.encode(message) for _, message in items],
        [name for name, _ in headers],
        [value for _, value in headers],
    )


def _encode_marker(instance: str, ids: Sequence[int]) -> bytes:
    # Ids of a batch are sorted and mostly consecutive: store runs, not every id. Runs are
    # exact (a gap left by a row that was not yet committed stays a gap).
    runs: list[list[int]] = []
    for id_ in ids:
        if runs and id_ == runs[-1][1] + 1:
            runs[-1][1] = id_
        else:
            runs.append([id_, id_])
    marker = {"v": 1, "instance": instance, "runs": runs}
    return json.dumps(marker, separators=(",", ":")).encode()


def _decode_marker(instance: str, data: bytes) -> list[int]:
    marker = json.loads(data)
    if marker.get("v") != 1 or marker.get("instance") != instance:
        raise OutboxError(f"unexpected outbox progress marker: {data[:200]!r}")
    return [id_ for first, last in marker["runs"] for id_ in range(first, last + 1)]


class _LeadershipLost(Exception):
    """The lock connection died: another relay may lead now."""


class OutboxRelay:
    """Publishes the outbox of one service database to Kafka, exactly once (see module doc).

    Run one per replica; they elect a single leader, and a standby takes over within
    ``standby_retry`` seconds when the leader's database session ends. Rows are not split
    between replicas (no ``SKIP LOCKED``): per-key order and exactly-once both need a single
    publisher, and one leader moves some 20,000 rows/s (500-row batches, local broker).

    One-shot: once stopped it cannot run again; make a new one.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        bootstrap: str,
        *,
        service: str,
        batch_size: int = 500,
        idle_wait: float = 0.2,
        standby_retry: float = 1.0,
    ) -> None:
        """Create the relay; nothing happens until :meth:`run`.

        Args:
            pool: Pool of the service database; the leader holds one of its connections for
                the lock (and LISTEN) and borrows another per batch.
            bootstrap: Kafka bootstrap servers.
            service: Service name, part of the transactional id and the progress topic; one
                per database (two databases of one service would fence each other).
            batch_size: Most rows per Kafka transaction.
            idle_wait: Poll interval when no notification arrives (a fallback).
            standby_retry: How often a standby tries to become leader.
        """
        self._pool = pool
        self._bootstrap = bootstrap
        self._service = service
        self._batch_size = batch_size
        self._idle_wait = idle_wait
        self._standby_retry = standby_retry
        self._instance = ""  # read from the database when leading
        self._progress_topic = ""
        self._stopping = asyncio.Event()
        self._run_done = asyncio.Event()
        self._running = False
        self._leader = False

    @property
    def is_leader(self) -> bool:
        """Whether this relay currently holds the leadership."""
        return self._leader

    async def stop(self) -> None:
        """Ask :meth:`run` to return and wait for it; a batch in flight is finished first."""
        self._stopping.set()
        if self._running:
            await self._run_done.wait()

    async def run(self) -> None:
        """Relay until :meth:`stop`: compete for leadership, then publish while leader.

        Errors (database or Kafka unavailable, being fenced) are logged, the leadership is
        released, and the relay competes again after a short delay; only cancellation ends it
        otherwise.
        """
        if self._running:
            raise RuntimeError("OutboxRelay.run() is already running")
        self._running = True
        self._run_done.clear()
        try:
            while not self._stopping.is_set():
                try:
                    lock_conn = await self._become_leader()
                    if lock_conn is None:
                        break
                    try:
                        await self._lead(lock_conn)
                    finally:
                        await self._release(lock_conn)
                except Exception:
                    # Database or Kafka unavailable, fenced by another leader, lock connection
                    # lost...: a relay that gives up silently is worse than one that retries.
                    log.exception("outbox relay of %s failed; retrying", self._service)
                    await self._sleep(_RETRY_DELAY)
        finally:
            self._running = False
            self._run_done.set()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up when stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _become_leader(self) -> asyncpg.pool.PoolConnectionProxy | None:
        """A pool connection holding the relay lock, or ``None`` when stopping."""
        while not self._stopping.is_set():
            conn = await self._pool.acquire()
            hold_session_state(conn)
            try:
                locked = await conn.fetchval("SELECT pg_try_advisory_lock($1)", RELAY_LOCK_KEY)
            except BaseException:
                await self._pool.release(conn)
                raise
            if locked:
                return conn
            await self._pool.release(conn)
            await self._sleep(self._standby_retry)
        return None

    async def _release(self, conn: asyncpg.pool.PoolConnectionProxy) -> None:
        try:
            await conn.execute("SELECT pg_advisory_unlock($1)", RELAY_LOCK_KEY)
        except asyncpg.InterfaceError:
            pass  # the session is gone, and the server released its lock with it
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("could not release the outbox relay lock: %r", exc)
        finally:
            # The pool resets this connection in full (hold_session_state): it also runs
            # pg_advisory_unlock_all() and UNLISTEN *; releasing a connection asyncpg already
            # took back is a no-op.
            await self._pool.release(conn)

    async def _lead(self, lock_conn: asyncpg.pool.PoolConnectionProxy) -> None:
        wake = asyncio.Event()
        lost = asyncio.Event()

        def on_notify(*_: object) -> None:
            wake.set()

        def on_terminated(*_: object) -> None:
            lost.set()
            wake.set()

        await lock_conn.add_listener(NOTIFY_CHANNEL, on_notify)
        lock_conn.add_termination_listener(on_terminated)
        producer: AIOKafkaProducer | None = None
        try:
            self._instance = str(await self._pool.fetchval("SELECT id FROM outbox_instance"))
            self._progress_topic = progress_topic(self._service, self._instance)
            txn_id = transactional_id(self._service, self._instance)
            await create_missing_topics(
                self._bootstrap,
                [
                    TopicSpec(
                        self._progress_topic,
                        partitions=1,
                        # Only the last marker matters; hourly segments let compaction run.
                        config={"cleanup.policy": "compact", "segment.ms": "3600000"},
                    )
                ],
            )
            producer = AIOKafkaProducer(
                bootstrap_servers=self._bootstrap,
                client_id=f"tidings-outbox-{self._service}-{uuid.uuid4().hex[:8]}",
                transactional_id=txn_id,
                transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
                enable_idempotence=True,
                acks="all",
                partitioner=KeyPartitioner(),
            )
            # Obtaining the producer id fences every older producer of this transactional id
            # and completes (aborts) a transaction it left open: from here on, nobody else can
            # commit to Kafka on this relay's behalf.
            await producer.start()
            self._leader = True
            log.info("outbox relay of %s is leader", self._service)
            await self._recover()

            checked = time.monotonic()
            while not self._stopping.is_set():
                if lost.is_set():
                    raise _LeadershipLost("the relay lock connection was closed")
                if time.monotonic() - checked > _LIVENESS_INTERVAL:
                    await asyncio.wait_for(lock_conn.fetchval("SELECT 1"), _LIVENESS_INTERVAL)
                    checked = time.monotonic()
                # Clear before reading: a notification arriving during the batch wakes us again.
                wake.clear()
                rows = await self._pool.fetch(_SELECT_BATCH, self._batch_size)
                if rows:
                    await self._publish(producer, rows)
                    continue
                stopping = asyncio.ensure_future(self._stopping.wait())
                woken = asyncio.ensure_future(wake.wait())
                try:
                    await asyncio.wait(
                        {stopping, woken},
                        timeout=self._idle_wait,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    stopping.cancel()
                    woken.cancel()
        finally:
            if self._leader:
                log.info("outbox relay of %s stops leading", self._service)
            self._leader = False
            if producer is not None:
                try:
                    await producer.stop()
                except Exception as exc:
                    log.warning("closing the outbox relay's producer failed: %r", exc)
            # A pooled connection that died was already detached from its proxy (every call
            # raises InterfaceError) and handed back to the pool by asyncpg.
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                lock_conn.remove_termination_listener(on_terminated)
                await lock_conn.remove_listener(NOTIFY_CHANNEL, on_notify)

    async def _recover(self) -> None:
        """Delete the rows of the last batch committed to Kafka (maybe by a dead leader)."""
        ids = await self._last_committed_batch()
        if ids:
            result = await self._pool.execute(_DELETE, ids)
            log.info(
                "outbox relay of %s: last committed batch had %d rows, %s still in the outbox",
                self._service,
                len(ids),
                result.split()[-1],
            )

    async def _last_committed_batch(self) -> list[int]:
        """Outbox ids listed by this database's last committed marker on the progress topic."""
        key = self._instance.encode()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            client_id=f"tidings-outbox-{self._service}-recovery",
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await consumer.start()
        try:
            tp = TopicPartition(self._progress_topic, 0)
            consumer.assign([tp])
            begin = (await consumer.beginning_offsets([tp]))[tp]
            # Read committed: the last stable offset. Only our transactional id writes here and
            # our producer already fenced every older one, so no transaction is open on this
            # partition and this is its end.
            end = (await consumer.end_offsets([tp]))[tp]
            # Each batch is a marker plus a commit control record; aborted ones add more.
            # Read a window before the end, widening it until a committed marker shows up.
            window = 64
            deadline = time.monotonic() + _RECOVERY_TIMEOUT
            while True:
                start = max(begin, end - window)
                consumer.seek(tp, start)
                last: bytes | None = None
                while await consumer.position(tp) < end:
                    if time.monotonic() > deadline:
                        raise OutboxError(
                            f"could not read {self._progress_topic} up to offset {end}"
                        )
                    batch = await consumer.getmany(tp, timeout_ms=1000)
                    for record in batch.get(tp, []):
                        if record.offset < end and record.key == key and record.value:
                            last = record.value
                if last is not None:
                    return _decode_marker(self._instance, last)
                if start == begin:
                    return []
                window *= 8
        finally:
            await consumer.stop()

    async def _publish(self, producer: AIOKafkaProducer, rows: Sequence[asyncpg.Record]) -> None:
        """Publish one batch in a Kafka transaction, then delete its rows."""
        ids = [row["id"] for row in rows]
        futures: list[asyncio.Future[object]] = []
        await producer.begin_transaction()
        try:
            await self._send_rows(producer, rows, futures)
            futures.append(
                await producer.send(
                    self._progress_topic,
                    value=_encode_marker(self._instance, ids),
                    key=self._instance.encode(),  # compaction keeps the last one
                    partition=0,
                )
            )
            # Every record acknowledged before the commit, so a failure surfaces here.
            await asyncio.gather(*futures)
            await self._before_kafka_commit(ids)
            await producer.commit_transaction()
        except BaseException:
            await self._abandon(producer, futures)
            raise
        self._after_kafka_commit(ids)
        await self._pool.execute(_DELETE, ids)

    async def _send_rows(
        self,
        producer: AIOKafkaProducer,
        rows: Sequence[asyncpg.Record],
        futures: list[asyncio.Future[object]],
    ) -> None:
        """Send ``rows`` in id order, filling one record batch per partition at a time.

        ``producer.send`` costs tens of microseconds per record (metadata wait, partitioner,
        accumulator); appending to a batch is a C call. Partitions are chosen as ``send`` would
        (:func:`~services.runtime.kafka.key_partition`, Kafka's default), so every key
        keeps its partition, and each partition's records go in the order of their ids.
        """
        partitions: dict[str, list[int]] = {}
        batches: dict[tuple[str, int], Any] = {}
        for row in rows:
            topic = row["topic"]
            if topic not in partitions:
                partitions[topic] = sorted(await producer.partitions_for(topic))
            key = row["key"].encode()
            partition = key_partition(key, partitions[topic])
            record = {
                "timestamp": None,
                "key": key,
                "value": bytes(row["payload"]),
                "headers": [
                    *zip(row["header_keys"], row["header_values"], strict=True),
                    (HEADER_EVENT_TYPE, row["event_type"].encode()),
                    (HEADER_OUTBOX_ID, str(row["id"]).encode()),
                ],
            }
            batch = batches.get((topic, partition))
            if batch is None:
                batch = batches[(topic, partition)] = producer.create_batch()
            if batch.append(**record) is None:  # full: send it, start the next one
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = batches[(topic, partition)] = producer.create_batch()
                if batch.append(**record) is None:
                    raise OutboxError(f"outbox row {row['id']} does not fit in a record batch")
        for (topic, partition), batch in batches.items():
            futures.append(await producer.send_batch(batch, topic, partition=partition))

    async def _abandon(
        self, producer: AIOKafkaProducer, futures: Sequence[asyncio.Future[object]]
    ) -> None:
        """Abort a failed transaction if the producer still can; never raises."""
        for future in futures:
            if future.done() and not future.cancelled():
                future.exception()  # seen: the error is reported by whoever raised
            else:
                future.add_done_callback(_retrieve_exception)
        # Aborting now, rather than leaving it to the next leader or the transaction timeout,
        # unblocks read_committed consumers of the partitions the batch touched.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await producer.abort_transaction()

    async def _before_kafka_commit(self, ids: Sequence[int]) -> None:
        """Called when a batch is sent but not committed; tests use it to stall a leader there."""

    def _after_kafka_commit(self, ids: Sequence[int]) -> None:
        """Called between the Kafka commit and the delete; tests use it to crash right there."""


def _retrieve_exception(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()
