"""gRPC surface of the journey service: wires its servicer into the shared runtime.

The servicer translates protobuf to domain calls and back, nothing else; its methods arrive
with the journey issues, so for now every call answers UNIMPLEMENTED.
"""

from __future__ import annotations

from pathlib import Path

import grpc.aio
from tidings.journey.v1 import journey_service_pb2, journey_service_pb2_grpc

from services.journey.settings import JourneySettings
from services.runtime.app import ServiceContext, ServiceSpec

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

JOURNEY_SERVICE = journey_service_pb2.DESCRIPTOR.services_by_name["JourneyService"].full_name


class JourneyServicer(journey_service_pb2_grpc.JourneyServiceServicer):
    """``tidings.journey.v1.JourneyService``: journeys, customers' journey state, stats."""

    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx


def register(server: grpc.aio.Server, ctx: ServiceContext) -> list[str]:
    """Add journey's servicer to ``server``; returns its full service name."""
    journey_service_pb2_grpc.add_JourneyServiceServicer_to_server(JourneyServicer(ctx), server)
    return [JOURNEY_SERVICE]


def spec(settings: JourneySettings | None = None) -> ServiceSpec:
    """The journey service for the runtime; settings are read from the environment by default."""
    return ServiceSpec(
        name="journey",
        settings=settings or JourneySettings(),
        migrations_dir=MIGRATIONS_DIR,
        register=register,
    )
