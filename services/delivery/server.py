"""gRPC surface of the delivery service: wires its servicer into the shared runtime.

The servicer translates protobuf to domain calls and back, nothing else; its methods arrive
with the delivery issues, so for now every call answers UNIMPLEMENTED.
"""

from __future__ import annotations

from pathlib import Path

import grpc.aio
from tidings.delivery.v1 import delivery_service_pb2, delivery_service_pb2_grpc

from services.delivery.settings import DeliverySettings
from services.runtime.app import ServiceContext, ServiceSpec

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

DELIVERY_SERVICE = delivery_service_pb2.DESCRIPTOR.services_by_name["DeliveryService"].full_name


class DeliveryServicer(delivery_service_pb2_grpc.DeliveryServiceServicer):
    """``tidings.delivery.v1.DeliveryService``: templates, channels, sends, broadcasts, messages."""

    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx


def register(server: grpc.aio.Server, ctx: ServiceContext) -> list[str]:
    """Add delivery's servicer to ``server``; returns its full service name."""
    delivery_service_pb2_grpc.add_DeliveryServiceServicer_to_server(DeliveryServicer(ctx), server)
    return [DELIVERY_SERVICE]


def spec(settings: DeliverySettings | None = None) -> ServiceSpec:
    """The delivery service for the runtime; settings are read from the environment by default."""
    return ServiceSpec(
        name="delivery",
        settings=settings or DeliverySettings(),
        migrations_dir=MIGRATIONS_DIR,
        register=register,
    )
