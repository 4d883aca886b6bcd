"""Typed Kafka topics with protobuf payloads, an idempotent producer and a batch consumer.

A :class:`Topic` ties a topic name to the protobuf message type it carries, so a producer cannot
put the wrong message on a topic and a consumer gets typed values back::

    producer = Producer(settings.kafka_bootstrap, client_id="identity")
    await producer.start()
    await producer.send(IDENTITY_EVENTS, event.user_id, event)   # returns once acked by all ISRs

    async def handle(records: Sequence[Record[TrackedEvent]]) -> None:
        async with pool.acquire() as conn, conn.transaction():
            fresh = await inbox.claim_new(conn, "identity.store-events",
                                          [r.value.event_id for r in records])
            ...  # store the fresh ones, in the same transaction

    consumer = BatchConsumer(settings.kafka_bootstrap, IDENTITY_EVENTS, handle,
                             group_id="identity.store-events", service="identity")
    async with consumer:
        await consumer.run()          # until consumer.stop() is called (e.g. on SIGTERM)

Delivery is at least once: offsets are committed after the handler returned, so a crash between
the handler's effect and the commit redelivers the batch. Handlers must be idempotent (the inbox,
or unique constraints). Records are keyed by user id, so one user's records stay in order.

Every record we produce carries a ``tidings-event-type`` header with the payload's full protobuf
name; records published by the outbox relay also carry ``tidings-outbox-id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import google.protobuf.message
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError, for_code
from aiokafka.structs import ConsumerRecord, RecordMetadata
from google.protobuf import timestamp_pb2
from murmurhash2 import murmurhash2
from tidings.events.v1.dead_letter_pb2 import DeadLetter
from tidings.events.v1.delivery_receipt_pb2 import DeliveryReceipt
from tidings.events.v1.identity_change_pb2 import IdentityChange
from tidings.events.v1.send_request_pb2 import SendRequest
from tidings.events.v1.tracked_event_pb2 import TrackedEvent

from services.runtime.db import DataPlaneError

__all__ = [
    "ALL_TOPICS",
    "DEAD_LETTERS",
    "DELIVERY_RECEIPTS",
    "DELIVERY_REQUESTS",
    "HEADER_EVENT_TYPE",
    "IDENTITY_CHANGES",
    "IDENTITY_EVENTS",
    "BatchConsumer",
    "Handler",
    "HandlerFailedError",
    "Headers",
    "KafkaProbe",
    "KafkaSetupError",
    "KeyPartitioner",
    "Producer",
    "Record",
    "RecordMetadata",
    "Topic",
    "TopicSpec",
    "create_missing_topics",
    "ensure_topics",
    "kafka_reachable",
    "key_partition",
    "start_new_group_at",
]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=google.protobuf.message.Message)

#: Kafka headers: (name, value) pairs; names may repeat.
Headers = Sequence[tuple[str, bytes]]

#: Header holding the payload's full protobuf name (e.g. ``tidings.events.v1.TrackedEvent``).
HEADER_EVENT_TYPE = "tidings-event-type"

_TOPIC_ALREADY_EXISTS = 36
_METADATA_POLL_INTERVAL = 0.05
_METADATA_POLLS = 400  # 20 s
#: Seed of the Java client's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``).
_MURMUR2_SEED = 0x9747B28C


def key_partition(key: bytes, partitions: Sequence[int]) -> int:
    """The partition of ``partitions`` (sorted by id) that Kafka's default partitioner, in
    every client, gives ``key``: murmur2 of the key, made positive, modulo the count.

    In C (``murmurhash2``): aiokafka's murmur2 is pure Python and cost ~10 µs a key, a
    quarter of an outbox relay's CPU at tens of thousands of records a second.
    """
    return partitions[(murmurhash2(key, _MURMUR2_SEED) & 0x7FFFFFFF) % len(partitions)]


class KeyPartitioner:
    """aiokafka's ``partitioner`` for our producers: :func:`key_partition` for keyed records
    (the same choice as aiokafka's default, faster), a random available partition otherwise."""

    def __call__(
        self, key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]
    ) -> int:
        if key is None:
            return random.choice(available or all_partitions)
        return key_partition(key, all_partitions)


class KafkaSetupError(DataPlaneError):
    """Topics could not be created or checked."""


class HandlerFailedError(DataPlaneError):
    """A :class:`BatchConsumer` handler kept failing on a batch; nothing of it was committed."""


@dataclass(frozen=True)
class Topic(Generic[M]):
    """A Kafka topic and the protobuf message type of its record values.

    Attributes:
        name: The topic name.
        message_type: The protobuf class every value on this topic is an instance of.
        partitions: Partitions to create it with; enough to add consumers later (the partition
            count of a keyed topic cannot change without reordering keys).
    """

    name: str
    message_type: type[M]
    partitions: int = 12

    @property
    def event_type(self) -> str:
        """Full protobuf name of the message type, as put in the event-type header."""
        return str(self.message_type.DESCRIPTOR.full_name)

    def encode(self, message: M) -> bytes:
        """Serialise a message for this topic.

        Raises:
            TypeError: ``message`` is not a ``message_type``; a guard against swapping topics.
        """
        if not isinstance(message, self.message_type):
            raise TypeError(
                f"topic {self.name} carries {self.event_type}, "
                f"not {type(message).DESCRIPTOR.full_name}"
            )
        return message.SerializeToString()

    def decode(self, data: bytes) -> M:
        """Parse a record value of this topic.

        Sharp edge: protobuf parsing is lenient, so bytes of another message type may parse
        without error (unknown fields are kept); only malformed bytes are refused.

        Raises:
            google.protobuf.message.DecodeError: ``data`` is not a valid encoding.
        """
        return self.message_type.FromString(data)


IDENTITY_EVENTS = Topic("identity.events", TrackedEvent)
IDENTITY_CHANGES = Topic("identity.changes", IdentityChange)
DELIVERY_REQUESTS = Topic("delivery.requests", SendRequest)
DELIVERY_RECEIPTS = Topic("delivery.receipts", DeliveryReceipt)
DEAD_LETTERS = Topic("tidings.dead-letters", DeadLetter)

#: Every topic the services use; each service creates them all at startup (idempotent).
ALL_TOPICS: tuple[Topic[Any], ...] = (
    IDENTITY_EVENTS,
    IDENTITY_CHANGES,
    DELIVERY_REQUESTS,
    DELIVERY_RECEIPTS,
    DEAD_LETTERS,
)


@dataclass(frozen=True)
class TopicSpec:
    """How to create a topic: name, partitions and topic-level config (e.g. ``cleanup.policy``)."""

    name: str
    partitions: int
    config: Mapping[str, str] = field(default_factory=dict)


async def ensure_topics(
    bootstrap: str,
    topics: Iterable[Topic[Any]],
    *,
    replication_factor: int | None = None,
) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are.

    Idempotent, and safe when several processes race to create the same topics.

    Args:
        bootstrap: Kafka bootstrap servers.
        topics: Topics to have.
        replication_factor: Replicas per partition; by default ``min(3, brokers in the cluster)``.

    Raises:
        KafkaSetupError: The broker refused to create one (other than "already exists").
    """
    await create_missing_topics(
        bootstrap,
        [TopicSpec(t.name, t.partitions) for t in topics],
        replication_factor=replication_factor,
    )


async def create_missing_topics(
    bootstrap: str,
    specs: Iterable[TopicSpec],
    *,
    replication_factor: int | None = None,
) -> None:
    """Like :func:`ensure_topics`, for topics described by a :class:`TopicSpec`.

    Returns once every topic is visible in the cluster metadata, so a consumer subscribing right
    after does not miss it. An existing topic is not altered (partitions, config).
    """
    wanted = {spec.name: spec for spec in specs}
    if not wanted:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="tidings-topics")
    try:
        await admin.start()
        missing = [name for name in wanted if name not in set(await admin.list_topics())]
        if not missing:
            return
        if replication_factor is None:
            brokers = len((await admin.describe_cluster())["brokers"])
            replication_factor = max(1, min(3, brokers))
        response = await admin.create_topics(
            [
                NewTopic(
                    name,
                    num_partitions=wanted[name].partitions,
                    replication_factor=replication_factor,
                    topic_configs=dict(wanted[name].config),
                )
                for name in missing
            ]
        )
        for name, code, message in _topic_errors(response):
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                raise KafkaSetupError(
                    f"creating topic {name} failed: {for_code(code).__name__}: {message}"
                )
            if code == 0:
                log.info("created Kafka topic %s", name)
        # The controller answers before every broker's metadata has the topic.
        for _ in range(_METADATA_POLLS):
            if set(missing) <= set(await admin.list_topics()):
                return
            await asyncio.sleep(_METADATA_POLL_INTERVAL)
        raise KafkaSetupError(f"topics {missing} were created but never showed up in metadata")
    finally:
        await admin.close()


def _topic_errors(response: Any) -> list[tuple[str, int, str | None]]:
    # CreateTopicsResponse v0 has (topic, error_code), later versions add error_message.
    result = []
    for entry in response.topic_errors:
        name, code, *rest = entry
        result.append((str(name), int(code), rest[0] if rest else None))
    return result


async def start_new_group_at(
    bootstrap: str, topic: str, group_id: str, since: datetime | None
) -> None:
    """Give the partitions a consumer group has no offsets for a start at ``since``.

    Every database of a service has its own group on a shared topic (a deployment, a test
    database); a brand-new group starting at the topic's beginning would re-read the whole
    retention of records that cannot be for it. So its uncommitted partitions start at the
    first records at or after ``since`` (the caller's "nothing for me before this"), or at the
    end when ``since`` is None. Partitions with committed offsets are left alone.

    Not fatal: if the commit is refused (another replica's member joined meanwhile, and it has
    positions) or the broker hiccups, the group keeps Kafka's default start, merely slower.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False
    )
    try:
        await consumer.start()
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            await admin.start()
            (described,) = await admin.describe_topics([topic])
        finally:
            await admin.close()
        partitions = [TopicPartition(topic, int(p["partition"])) for p in described["partitions"]]
        uncommitted = [tp for tp in partitions if await consumer.committed(tp) is None]
        if not uncommitted:
            return
        consumer.assign(uncommitted)
        # End offsets first: a record for this group produced after ``since`` is either found by
        # the time lookup or lies past these ends.
        offsets = await consumer.end_offsets(uncommitted)
        if since is not None:
            found = await consumer.offsets_for_times(
                {tp: int(since.timestamp() * 1000) for tp in uncommitted}
            )
            offsets = {
                tp: found[tp].offset if found.get(tp) is not None else end
                for tp, end in offsets.items()
            }
        await consumer.commit(offsets)
        log.info(
            "consumer group %s starts at %s",
            group_id,
            since.isoformat() if since is not None else "the end of the topic",
        )
    except KafkaError as exc:
        log.warning("could not set the start offsets of %s: %r", group_id, exc)
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


class KafkaProbe:
    """Answers "is the cluster reachable?" cheaply, again and again (the health watchdog).

    One admin client is kept between probes, and a probe asks for the metadata of a single topic:
    a fresh client per probe would fetch the metadata of every topic on the broker twice (when it
    bootstraps and for ``describe_cluster``), which on a broker with many topics costs real CPU
    every few seconds. After a failure the client is dropped and the next probe starts afresh.

    Args:
        bootstrap: The cluster's bootstrap servers.
        topic: The topic whose metadata a probe requests (need not exist).
    """

    def __init__(self, bootstrap: str, topic: str = IDENTITY_EVENTS.name) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._admin: AIOKafkaAdminClient | None = None

    async def reachable(self, timeout: float = 5.0) -> bool:  # noqa: ASYNC109
        """Whether the cluster answers within ``timeout`` seconds; never raises."""
        try:
            async with asyncio.timeout(timeout):
                if self._admin is None:
                    admin = AIOKafkaAdminClient(
                        bootstrap_servers=self._bootstrap,
                        client_id="tidings-probe",
                        request_timeout_ms=max(1, int(timeout * 1000)),
                    )
                    self._admin = admin
                    await admin.start()
                await self._admin.describe_topics([self._topic])
            return True
        except Exception as exc:  # a probe reports, it never raises
            log.warning("Kafka not reachable at %s: %r", self._bootstrap, exc)
            await self.close()
            return False

    async def close(self) -> None:
        """Release the client (a later probe opens a new one)."""
        admin, self._admin = self._admin, None
        if admin is not None:
            with contextlib.suppress(Exception):
                await admin.close()


async def kafka_reachable(bootstrap: str, timeout: float = 5.0) -> bool:  # noqa: ASYNC109
    """Whether the cluster answers a metadata request within ``timeout`` seconds; never raises."""
    probe = KafkaProbe(bootstrap)
    try:
        return await probe.reachable(timeout)
    finally:
        await probe.close()


def _retrieve_exception(future: asyncio.Future[Any]) -> None:
    # Marks a failed future's exception as seen: when its caller was cancelled nobody awaits it,
    # and the loop would report "Future exception was never retrieved".
    if not future.cancelled():
        future.exception()


def _with_event_type(headers: Headers, event_type: str) -> list[tuple[str, bytes]]:
    return [*headers, (HEADER_EVENT_TYPE, event_type.encode())]


class Producer:
    """An idempotent producer (``enable_idempotence=True``, ``acks="all"``) of typed records.

    Idempotence makes the broker drop the duplicates its own retries would create and keeps each
    partition in send order; it does not make two calls of :meth:`send` with the same message
    one record (deduplicate by event id downstream).

    Sharp edges:
        * Cancelling :meth:`send` after the record was handed to the client does not unsend it;
          the record may still be written.
        * ``key`` is the user id: Kafka orders records per partition, and the partition is the
          hash of the key, so one user's records stay in order only if they all use this key.
    """

    def __init__(self, bootstrap: str, *, client_id: str, **kw: Any) -> None:
        """Create (but not start) the producer.

        Args:
            bootstrap: Kafka bootstrap servers.
            client_id: Names this client in broker logs and metrics.
            **kw: Passed on to :class:`aiokafka.AIOKafkaProducer` (e.g. ``linger_ms``,
                ``compression_type``); idempotence and acks cannot be weakened.
        """
        # Batches of 256 KiB (aiokafka's default is 16 KiB): the client sends one request per
        # broker at a time, so the batch size bounds what one round trip carries.
        kw.setdefault("max_batch_size", 256 * 1024)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            enable_idempotence=True,
            acks="all",
            partitioner=KeyPartitioner(),
            **kw,
        )

    async def start(self) -> None:
        """Connect to the cluster and obtain a producer id."""
        await self._producer.start()

    async def stop(self) -> None:
        """Deliver what is pending, then close."""
        await self._producer.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def send(
        self, topic: Topic[M], key: str, message: M, headers: Headers = ()
    ) -> RecordMetadata:
        """Publish one record and wait until all in-sync replicas have it.

        Args:
            topic: Where to publish; ``message`` must be of its type.
            key: Record key, the user id (encoded as UTF-8).
            message: The payload.
            headers: Extra headers; the event-type header is added.

        Returns:
            Partition and offset of the record.
        """
        future = await self._producer.send(
            topic.name,
            value=topic.encode(message),
            key=key.encode(),
            headers=_with_event_type(headers, topic.event_type),
        )
        # If our caller is cancelled meanwhile, nobody awaits the future: mark its error seen.
        future.add_done_callback(_retrieve_exception)
        metadata: RecordMetadata = await future
        return metadata

    async def send_many(
        self, topic: Topic[M], items: Sequence[tuple[str, M]], headers: Headers = ()
    ) -> list[RecordMetadata]:
        """Publish ``(key, message)`` pairs and wait for all acks.

        Records are grouped by partition and handed to the client as ready-made batches
        (``create_batch``/``send_batch``) rather than one :meth:`send` each: per record that
        costs a C-level append instead of a future and a trip through the accumulator, which is
        what lets a service publish tens of thousands of records per second. Partitions are
        chosen exactly as the default partitioner does (murmur2 of the key), so records of one
        key land where :meth:`send` would put them.

        Records of one key keep the order of ``items``. If this raises, some records may
        have been written and others not.

        Returns:
            Partition and offset of each record, in the order of ``items``.
        """
        if not items:
            return []
        header_list = _with_event_type(headers, topic.event_type)
        partitions = sorted(await self._producer.partitions_for(topic.name))
        by_partition: dict[int, list[tuple[int, bytes, bytes]]] = {}
        for index, (key, message) in enumerate(items):
            key_bytes = key.encode()
            partition = key_partition(key_bytes, partitions)
            by_partition.setdefault(partition, []).append((index, key_bytes, topic.encode(message)))
        # One entry per batch sent: its ack future, and (item index, offset in batch) pairs.
        sent: list[tuple[asyncio.Future[RecordMetadata], list[tuple[int, int]]]] = []
        for partition, records in by_partition.items():
            batch = self._producer.create_batch()
            members: list[tuple[int, int]] = []
            for index, key_bytes, value in records:
                appended = batch.append(
                    key=key_bytes, value=value, timestamp=None, headers=header_list
                )
                if appended is None:  # full: send it, start the next (a first record fits)
                    sent.append((await self._send_batch(batch, topic, partition), members))
                    batch, members = self._producer.create_batch(), []
                    appended = batch.append(
                        key=key_bytes, value=value, timestamp=None, headers=header_list
                    )
                members.append((index, appended.offset))
            sent.append((await self._send_batch(batch, topic, partition), members))
        acks = await asyncio.gather(*(future for future, _ in sent), return_exceptions=True)
        results: list[RecordMetadata | None] = [None] * len(items)
        for ack, (_, members) in zip(acks, sent, strict=True):
            if isinstance(ack, BaseException):
                raise ack
            for index, relative in members:
                results[index] = ack._replace(offset=ack.offset + relative)
        return [result for result in results if result is not None]

    async def _send_batch(
        self, batch: Any, topic: Topic[Any], partition: int
    ) -> asyncio.Future[RecordMetadata]:
        batch.close()  # nothing else may be appended by send() meanwhile
        future: asyncio.Future[RecordMetadata] = await self._producer.send_batch(
            batch, topic.name, partition=partition
        )
        future.add_done_callback(_retrieve_exception)
        return future


@dataclass(frozen=True)
class Record(Generic[M]):
    """One consumed record with its decoded value.

    Attributes:
        topic: Topic it came from.
        partition: Partition it came from.
        offset: Its offset in that partition.
        key: The record key (the user id); ``""`` for a record without key.
        value: The decoded payload.
        headers: The record's headers, as sent.
        timestamp_ms: Record timestamp (producer's create time), milliseconds since the epoch.
    """

    topic: str
    partition: int
    offset: int
    key: str
    value: M
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int = 0

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name``, or ``None``."""
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found


#: What a :class:`BatchConsumer` calls with each polled batch.
Handler = Callable[[Sequence[Record[M]]], Awaitable[None]]


class _ShareListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Reports a member's share of a topic's partitions after each rebalance."""

    def __init__(
        self, consumer: AIOKafkaConsumer, topic: str, report: Callable[[int, int], None]
    ) -> None:
        self._consumer = consumer
        self._topic = topic
        self._report = report

    async def on_partitions_revoked(self, revoked: Set[TopicPartition]) -> None:
        """Report ``(0, total)``: until the next assignment this member owns nothing (a batch
        it is finishing must not keep the share that another member may now be taking)."""
        if any(tp.topic == self._topic for tp in revoked):
            self._report(0, self._total(0))

    async def on_partitions_assigned(self, assigned: Set[TopicPartition]) -> None:
        """Report ``(owned, total)``; total from the consumer's metadata."""
        owned = sum(1 for tp in self._consumer.assignment() if tp.topic == self._topic)
        self._report(owned, self._total(owned))

    def _total(self, owned: int) -> int:
        return len(self._consumer.partitions_for_topic(self._topic) or ()) or owned


class BatchConsumer(Generic[M]):
    """A consumer-group member that hands each polled batch of one topic to an async handler.

    Life cycle: :meth:`start` (or ``async with``), then :meth:`run` until :meth:`stop`::

        async with BatchConsumer(bootstrap, IDENTITY_CHANGES, handle,
                                 group_id="journey.identity-changes", service="journey") as c:
            await c.run()

    Semantics:
        * ``enable_auto_commit=False`` and ``isolation_level="read_committed"``: records of
          aborted transactions are never seen, and a batch's offsets are committed only after
          ``handler(records)`` returned, so its effect is stored first (at least once).
        * A record whose key is not UTF-8 or whose value does not decode is published to the
          dead-letter topic with the reason (waiting for the ack) and skipped; it never blocks
          its partition.
        * A handler that raises is retried with the same batch ``retries`` times, with
          exponential backoff. If it still fails, :meth:`run` stops the consumer without
          committing and raises :class:`HandlerFailedError`: the group rebalances, and another
          member (or this service after a restart) gets the batch again.
        * A batch holds records of several partitions, ordered by offset within each; records of
          one key are always in one partition, hence in order.

    Sharp edges:
        * If the group rebalances while the handler runs, the commit fails (logged) and the new
          owner of those partitions processes the batch again: handlers must be idempotent.
        * A handler slower than ``max_poll_interval_ms`` (aiokafka default 5 min) gets this
          member evicted from the group, with the same effect.
        * A new group starts at the earliest offset (``auto_offset_reset="earliest"``), so a
          service deployed for the first time processes the topic's whole retention.
        * Create it inside the running event loop and always :meth:`stop` it (also when it was
          never started): aiokafka reports clients that were never closed as loop errors.
        * One-shot: once stopped it cannot run again; make a new one.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: Topic[M],
        handler: Handler[M],
        *,
        group_id: str,
        service: str,
        client_id: str | None = None,
        max_batch: int = 500,
        retries: int = 3,
        retry_backoff: float = 0.2,
        dead_letters: Topic[DeadLetter] = DEAD_LETTERS,
        auto_offset_reset: str = "earliest",
        on_partitions: Callable[[int, int], None] | None = None,
        **kw: Any,
    ) -> None:
        """Create (but not start) the consumer.

        Args:
            bootstrap: Kafka bootstrap servers.
            topic: The topic to consume.
            handler: Awaited with each batch (never empty); must be idempotent.
            group_id: Consumer group; use one group per (service, purpose), e.g.
                ``"journey.receipts"``.
            service: Name recorded in dead letters.
            client_id: Names this client in broker logs; defaults to ``service``.
            max_batch: Most records per batch.
            retries: How often a failing batch is retried in place before giving up.
            retry_backoff: First retry delay in seconds; doubles per retry, capped at 10 s.
            dead_letters: Where undecodable records go.
            auto_offset_reset: Where a group without committed offsets starts.
            on_partitions: Called after each rebalance with (the topic's partitions this member
                owns, the topic's partitions), for work split by share of the group; with
                (0, partitions) when its partitions are revoked, before the next assignment.
            **kw: Passed on to :class:`aiokafka.AIOKafkaConsumer`.
        """
        self._topic = topic
        self._handler = handler
        self._group_id = group_id
        self._service = service
        self._max_batch = max_batch
        self._retries = retries
        self._retry_backoff = retry_backoff
        self._dead_letters = dead_letters
        client_id = client_id or service
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            group_id=group_id,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset=auto_offset_reset,
            max_poll_records=max_batch,
            **kw,
        )
        self._consumer.subscribe(
            [topic.name],
            listener=_ShareListener(self._consumer, topic.name, on_partitions)
            if on_partitions is not None
            else None,
        )
        self._dead_letter_producer = Producer(bootstrap, client_id=f"{client_id}-dead-letters")
        self._started = False
        self._closed = False
        self._stopping = asyncio.Event()
        self._run_active = False
        self._run_done = asyncio.Event()

    async def start(self) -> None:
        """Connect; the group is joined on the first poll of :meth:`run`."""
        if self._started:
            return
        self._started = True
        await self._dead_letter_producer.start()
        await self._consumer.start()

    async def stop(self) -> None:
        """Stop :meth:`run` and leave the group; idempotent.

        A batch being handled is finished and committed first (a batch being retried is
        abandoned, uncommitted); a poll in progress is abandoned.
        """
        self._stopping.set()
        if self._run_active:
            await self._run_done.wait()  # run() closes the clients on its way out
        else:
            await self._close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def run(self) -> None:
        """Consume until :meth:`stop` is called; starts the consumer if needed.

        Cancelling it cancels the handler in progress (its transaction rolls back) and closes
        the consumer without committing that batch.

        Raises:
            HandlerFailedError: The handler failed on a batch ``retries + 1`` times; the consumer
                is stopped with nothing of that batch committed.
        """
        if self._run_active:
            raise RuntimeError("BatchConsumer.run() is already running")
        self._run_active = True
        try:
            await self.start()
            while not self._stopping.is_set():
                batch = await self._poll()
                if batch:
                    await self._process(batch)
        finally:
            try:
                await self._close()
            finally:
                self._run_active = False
                self._run_done.set()

    async def _poll(self) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        poll = asyncio.ensure_future(
            self._consumer.getmany(timeout_ms=1000, max_records=self._max_batch)
        )
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({poll, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not poll.done():
                poll.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poll
        if poll.cancelled():
            return {}
        result: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = poll.result()
        return result

    async def _process(
        self, batch: Mapping[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
    ) -> None:
        records: list[Record[M]] = []
        dead: list[tuple[ConsumerRecord[bytes, bytes], str]] = []
        for raw_records in batch.values():
            for raw in raw_records:
                decoded = self._decode(raw)
                if isinstance(decoded, str):
                    dead.append((raw, decoded))
                else:
                    records.append(decoded)
        if dead:
            await self._send_dead_letters(dead)
        if records and not await self._handle(records):
            return
        offsets = {tp: raws[-1].offset + 1 for tp, raws in batch.items() if raws}
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # Partitions moved to another member meanwhile; it will process them again.
            log.warning("commit of %s failed after a rebalance: %r", offsets, exc)

    def _decode(self, raw: ConsumerRecord[bytes, bytes]) -> Record[M] | str:
        """The decoded record, or why it cannot be decoded."""
        try:
            key = raw.key.decode("utf-8") if raw.key is not None else ""
        except UnicodeDecodeError as exc:
            return f"key is not UTF-8: {exc}"
        if raw.value is None:
            return "record has no value"
        try:
            value = self._topic.decode(raw.value)
        except google.protobuf.message.DecodeError as exc:
            return f"value is not a valid {self._topic.event_type}: {exc}"
        return Record(
            topic=raw.topic,
            partition=raw.partition,
            offset=raw.offset,
            key=key,
            value=value,
            headers=tuple(raw.headers),
            timestamp_ms=raw.timestamp,
        )

    async def _send_dead_letters(
        self, dead: Sequence[tuple[ConsumerRecord[bytes, bytes], str]]
    ) -> None:
        now = timestamp_pb2.Timestamp()
        now.FromNanoseconds(time.time_ns())
        items = []
        for raw, reason in dead:
            log.error("dead-lettering %s[%d]@%d: %s", raw.topic, raw.partition, raw.offset, reason)
            letter = DeadLetter(
                event_id=str(uuid.uuid4()),
                source_topic=raw.topic,
                key=raw.key or b"",
                value=raw.value or b"",
                service=self._service,
                reason=f"{reason} (partition {raw.partition}, offset {raw.offset})",
                occurred_at=now,
            )
            items.append((raw.key.decode("utf-8", "replace") if raw.key else "", letter))
        await self._dead_letter_producer.send_many(self._dead_letters, items)

    async def _handle(self, records: Sequence[Record[M]]) -> bool:
        """Whether the handler succeeded; ``False`` when stopping interrupted the retries."""
        delay = self._retry_backoff
        for attempt in range(self._retries + 1):
            try:
                await self._handler(records)
                return True
            except Exception as exc:
                first, last = records[0], records[-1]
                if attempt == self._retries:
                    raise HandlerFailedError(
                        f"{self._group_id}: handler failed {attempt + 1} times on a batch of "
                        f"{len(records)} records of {self._topic.name} "
                        f"({first.partition}@{first.offset}..{last.partition}@{last.offset})"
                    ) from exc
                log.warning(
                    "%s: handler failed on %d records (attempt %d of %d), retrying in %.1fs: %r",
                    self._group_id,
                    len(records),
                    attempt + 1,
                    self._retries + 1,
                    delay,
                    exc,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                # Leave the batch uncommitted for whoever gets the partitions next.
                log.warning("%s: stopping; abandoning a failing batch", self._group_id)
                return False
            delay = min(delay * 2, 10.0)
        return False  # not reached: the last attempt returns or raises

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Without auto-commit, stopping commits nothing; it leaves the group so the partitions
        # move to another member at once instead of after the session timeout.
        try:
            await self._consumer.stop()
        finally:
            await self._dead_letter_producer.stop()
