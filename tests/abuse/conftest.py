"""The abuse suite's stack: identity, delivery and journey as separate real processes.

One set of processes (each on its own scratch database, real Postgres and Kafka) serves the whole
session; tests isolate themselves by app. Journey runs with ``webhook_allow_private`` off, as in
production, so its SSRF guard is the one under test; delivery's webhook channel refuses
non-public addresses unless the channel's credentials allow them.

Hypothesis profiles: ``ci`` (default, small) and ``full`` (``HYPOTHESIS_PROFILE=full``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from hypothesis import HealthCheck, settings
from tidings.delivery.v1 import delivery_service_pb2_grpc
from tidings.identity.v1 import apps_service_pb2_grpc, identity_service_pb2_grpc
from tidings.journey.v1 import journey_service_pb2_grpc

from tests.conftest import temporary_database
from tests.delivery.support import delivery_env
from tests.e2e.processes import ServiceProcess, running_service
from tests.identity.conftest import TestApp, create_test_app
from tests.journey.support import journey_process

settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    database=None,  # no .hypothesis/ in the work tree; a failure prints its reproduction
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "full",
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@dataclass(frozen=True)
class Stack:
    """The three running services, their databases and stubs."""

    identity: ServiceProcess
    delivery: ServiceProcess
    journey: ServiceProcess
    identity_db: str
    delivery_db: str
    journey_db: str
    identity_channel: grpc.aio.Channel
    delivery_channel: grpc.aio.Channel
    journey_channel: grpc.aio.Channel

    @property
    def apps(self) -> Any:
        return apps_service_pb2_grpc.AppsServiceStub(self.identity_channel)

    @property
    def users(self) -> Any:
        return identity_service_pb2_grpc.IdentityServiceStub(self.identity_channel)

    @property
    def deliveries(self) -> Any:
        return delivery_service_pb2_grpc.DeliveryServiceStub(self.delivery_channel)

    @property
    def journeys(self) -> Any:
        return journey_service_pb2_grpc.JourneyServiceStub(self.journey_channel)

    def channel_of(self, service_full_name: str) -> grpc.aio.Channel:
        """The channel of the process serving ``service_full_name`` (by package)."""
        package = service_full_name.split(".")[1]
        return {
            "identity": self.identity_channel,
            "delivery": self.delivery_channel,
            "journey": self.journey_channel,
        }[package]

    def process_of(self, service_full_name: str) -> ServiceProcess:
        package = service_full_name.split(".")[1]
        return {"identity": self.identity, "delivery": self.delivery, "journey": self.journey}[
            package
        ]

    async def all_healthy(self) -> bool:
        """Every process is running and answers its health check with SERVING."""
        for service in (self.identity, self.delivery, self.journey):
            if service.process.returncode is not None:
                return False
            if await service.health() != 1:  # SERVING
                return False
        return True


@pytest.fixture(scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    logs: Path = tmp_path_factory.mktemp("abuse")
    async with (
        temporary_database() as identity_db,
        temporary_database() as delivery_db,
        temporary_database() as journey_db,
        running_service("identity", database_url=identity_db, log_dir=logs) as identity,
    ):
        await identity.wait_serving()
        env, _ = delivery_env(identity.grpc_target)
        async with running_service(
            "delivery", database_url=delivery_db, log_dir=logs, env=env
        ) as delivery:
            await delivery.wait_serving()
            async with (
                journey_process(
                    identity,
                    journey_db,
                    logs,
                    delivery_target=delivery.grpc_target,
                    webhook_allow_private="false",
                ) as journey,
                grpc.aio.insecure_channel(identity.grpc_target) as ich,
                grpc.aio.insecure_channel(delivery.grpc_target) as dch,
                grpc.aio.insecure_channel(journey.grpc_target) as jch,
            ):
                yield Stack(
                    identity, delivery, journey, identity_db, delivery_db, journey_db, ich, dch, jch
                )


@pytest.fixture
async def app(stack: Stack) -> TestApp:
    """A fresh app with a server and a client key."""
    return await create_test_app(stack.apps)
