"""Helpers of the journey tests: definitions, the send-request feed, processes, polling.

Journeys are built from small node helpers (``send("push", next="wait")``). The feed reads
``delivery.requests`` from the moment it opens, as a read_committed consumer in no group, so a
test counts exactly the send requests its journeys produced (by idempotency key).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from google.protobuf import duration_pb2, struct_pb2
from google.rpc import error_details_pb2, status_pb2
from tidings.events.v1.delivery_receipt_pb2 import DeliveryReceipt
from tidings.events.v1.send_request_pb2 import SendRequest
from tidings.identity.v1 import segment_pb2
from tidings.journey.v1 import journey_pb2 as jpb
from tidings.journey.v1 import journey_service_pb2 as pb
from tidings.journey.v1 import journey_service_pb2_grpc

from services.runtime.kafka import DELIVERY_RECEIPTS, DELIVERY_REQUESTS
from tests.conftest import KAFKA_BOOTSTRAP
from tests.e2e.processes import ServiceProcess, start_service
from tests.runtime.kafka_helpers import partitions_of

T = TypeVar("T")

# -- definitions --------------------------------------------------------------------------------


def seconds(value: float) -> duration_pb2.Duration:
    """A Duration."""
    d = duration_pb2.Duration()
    d.FromTimedelta(__import__("datetime").timedelta(seconds=value))
    return d


def node(node_id: str, **kind: Any) -> jpb.Node:
    """A node: ``node("a", send=jpb.SendNode(...), next={"next": "b"})``."""
    nxt = kind.pop("next", {})
    message = jpb.Node(node_id=node_id, **kind)
    message.next.update(nxt)
    return message


def send(
    node_id: str, template: str = "tpl-1", channels: tuple[str, ...] = ("ios_push",), **wiring: str
) -> jpb.Node:
    """A send node; ``wiring`` maps outputs to nodes (``next="b"``)."""
    return node(
        node_id, send=jpb.SendNode(template_id=template, channels=list(channels)), next=wiring
    )


def exit_node(node_id: str = "end") -> jpb.Node:
    """An exit node."""
    return node(node_id, exit=jpb.ExitNode())


def delay(node_id: str, length: float, **wiring: str) -> jpb.Node:
    """A duration delay."""
    return node(node_id, delay=jpb.DelayNode(duration=seconds(length)), next=wiring)


def definition(
    *nodes: jpb.Node,
    entry: jpb.Entry | None = None,
    start: str = "",
    **extra: Any,
) -> jpb.JourneyDefinition:
    """A definition (entry: a customer list unless given; start: the first node)."""
    return jpb.JourneyDefinition(
        entry=entry or jpb.Entry(customer_list=jpb.Entry.CustomerList()),
        start_node_id=start or nodes[0].node_id,
        nodes=list(nodes),
        **extra,
    )


def event_entry(name: str, *where: segment_pb2.PropertyCondition) -> jpb.Entry:
    """An entry on a custom event."""
    return jpb.Entry(event=jpb.Entry.CustomEvent(name=name, where=list(where)))


def struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    """A Struct."""
    s = struct_pb2.Struct()
    s.update(dict(values))
    return s


def journey_stub(channel: grpc.aio.Channel) -> Any:
    """A JourneyService stub."""
    return journey_service_pb2_grpc.JourneyServiceStub(channel)


async def create_active(
    stub: Any, metadata: Any, d: jpb.JourneyDefinition, name: str = "j"
) -> jpb.Journey:
    """Create and activate a journey."""
    created = await stub.CreateJourney(
        pb.CreateJourneyRequest(journey=jpb.Journey(display_name=name, definition=d)),
        metadata=metadata,
    )
    activated: jpb.Journey = await stub.ActivateJourney(
        pb.ActivateJourneyRequest(journey_id=created.journey_id), metadata=metadata
    )
    return activated


def error_domain(status: status_pb2.Status) -> str:
    """The ``ErrorInfo.domain`` of a per-item error (``""`` without one)."""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.domain)
    return ""


# -- polling ------------------------------------------------------------------------------------


# -- the feed of send requests ----------------------------------------------------------------


class SendFeed:
    """``delivery.requests`` records since the feed opened (of one app, if given)."""

    def __init__(self, app_id: str = "") -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=KAFKA_BOOTSTRAP,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        self.app_id = app_id
        self.requests: list[SendRequest] = []

    async def __aenter__(self) -> SendFeed:
        await self._consumer.start()
        tps = [
            TopicPartition(DELIVERY_REQUESTS.name, p)
            for p in await partitions_of(KAFKA_BOOTSTRAP, DELIVERY_REQUESTS.name)
        ]
        self._consumer.assign(tps)
        for tp, offset in (await self._consumer.end_offsets(tps)).items():
            self._consumer.seek(tp, offset)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def poll(self) -> None:
        """Read what arrived."""
        batches = await self._consumer.getmany(timeout_ms=200, max_records=5000)
        for records in batches.values():
            for record in records:
                if record.value is None:
                    continue
                request = DELIVERY_REQUESTS.decode(record.value)
                if not self.app_id or request.app_id == self.app_id:
                    self.requests.append(request)

    def of(self, journey_id: str = "", node_id: str = "") -> list[SendRequest]:
        """Requests of a journey (and node)."""
        return [
            r
            for r in self.requests
            if (not journey_id or r.journey_id == journey_id)
            and (not node_id or r.journey_node_id == node_id)
        ]

    async def wait_for(
        self, count: int, journey_id: str = "", node_id: str = "", within: float = 30.0
    ) -> list[SendRequest]:
        """Wait until at least ``count`` requests (of a journey/node) arrived."""
        deadline = time.monotonic() + within
        while len(self.of(journey_id, node_id)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(self.of(journey_id, node_id))} of {count} send requests arrived"
                )
            await self.poll()
        return self.of(journey_id, node_id)

    async def settle(self, seconds: float = 1.5) -> None:
        """Keep reading for a while (to see that nothing more arrives)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await self.poll()


async def publish_receipts(receipts: list[tuple[str, DeliveryReceipt]]) -> None:
    """Put receipts on ``delivery.receipts`` as delivery would (keyed by user id)."""
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA_BOOTSTRAP, acks="all")
    await producer.start()
    try:
        for key, receipt in receipts:
            await producer.send_and_wait(
                DELIVERY_RECEIPTS.name, DELIVERY_RECEIPTS.encode(receipt), key=key.encode()
            )
    finally:
        await producer.stop()


def receipt(request: SendRequest, status: int, event_id: str) -> tuple[str, DeliveryReceipt]:
    """A receipt for a journey's send request."""
    message = DeliveryReceipt(
        event_id=event_id,
        app_id=request.app_id,
        user_id=request.user_id,
        message_id=event_id,
        status=status,  # type: ignore[arg-type]
        idempotency_key=request.idempotency_key,
        journey_id=request.journey_id,
        journey_node_id=request.journey_node_id,
    )
    message.occurred_at.GetCurrentTime()
    return request.user_id, message


# -- processes ----------------------------------------------------------------------------------


def journey_env(identity: ServiceProcess, **extra: str) -> dict[str, str]:
    """Settings of a journey process talking to ``identity`` (no delivery: templates unchecked)."""
    env = {
        "TIDINGS_IDENTITY_TARGET": identity.grpc_target,
        "TIDINGS_DELIVERY_TARGET": "",
        "TIDINGS_WEBHOOK_ALLOW_PRIVATE": "true",
        "TIDINGS_ENGINE_IDLE_WAIT": "0.05",
        "TIDINGS_LOG_LEVEL": "INFO",
    }
    env.update({f"TIDINGS_{k.upper()}": v for k, v in extra.items()})
    return env


async def start_journey(
    identity: ServiceProcess, database_url: str, log_dir: Path, **extra: str
) -> ServiceProcess:
    """A journey process, serving, with its consumers set up."""
    service = await start_service(
        "journey", database_url=database_url, log_dir=log_dir, env=journey_env(identity, **extra)
    )
    await service.wait_serving()
    if extra.get("run_engine", "true") != "false":
        for purpose in ("events", "changes", "receipts"):
            await service.wait_for_log(f"consumer {purpose} of")
    return service


@contextlib.asynccontextmanager
async def journey_process(
    identity: ServiceProcess, database_url: str, log_dir: Path, **extra: str
) -> AsyncIterator[ServiceProcess]:
    """:func:`start_journey`, killed on exit."""
    service = await start_journey(identity, database_url, log_dir, **extra)
    try:
        yield service
    finally:
        await service.kill()
