"""Real processes for the delivery tests: identity and delivery, each on its own scratch database.

Delivery is started with its identity pointed at the test identity, a free tracking port, and
short retry and scheduler intervals, so retries and deferrals play out in seconds. Tests isolate
themselves by app: each gets a fresh app with a server and a client key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc.aio
import pytest
from tidings.delivery.v1 import delivery_service_pb2_grpc
from tidings.identity.v1 import apps_service_pb2_grpc, identity_service_pb2_grpc

from tests.conftest import temporary_database
from tests.delivery.sink import Sink
from tests.delivery.support import DeliveryHarness, delivery_env
from tests.e2e.processes import ServiceProcess, running_service
from tests.identity.conftest import TestApp, create_test_app

if TYPE_CHECKING:
    from tidings.identity.v1.apps_service_pb2_grpc import AppsServiceAsyncStub


@pytest.fixture(scope="session")
async def identity_service(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[ServiceProcess]:
    """identity as a real process, for the delivery tests of the session."""
    async with (
        temporary_database() as dsn,
        running_service(
            "identity", database_url=dsn, log_dir=tmp_path_factory.mktemp("identity")
        ) as service,
    ):
        await service.wait_serving()
        yield service


@pytest.fixture(scope="session")
async def delivery_db() -> AsyncIterator[str]:
    """The delivery database of the session's delivery process."""
    async with temporary_database() as dsn:
        yield dsn


@pytest.fixture(scope="session")
async def delivery_service(
    identity_service: ServiceProcess,
    delivery_db: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[ServiceProcess, int]]:
    """delivery as a real process (worker, scheduler, fan-out, tracking); and its tracking port."""
    env, tracking_port = delivery_env(identity_service.grpc_target)
    async with running_service(
        "delivery",
        database_url=delivery_db,
        log_dir=tmp_path_factory.mktemp("delivery"),
        env=env,
    ) as service:
        await service.wait_serving()
        await service.wait_for_log("tracking endpoint on")
        yield service, tracking_port


@pytest.fixture(scope="session")
async def channels(
    identity_service: ServiceProcess, delivery_service: tuple[ServiceProcess, int]
) -> AsyncIterator[tuple[grpc.aio.Channel, grpc.aio.Channel]]:
    async with (
        grpc.aio.insecure_channel(identity_service.grpc_target) as identity,
        grpc.aio.insecure_channel(delivery_service[0].grpc_target) as delivery,
    ):
        yield identity, delivery


@pytest.fixture(scope="session")
def apps_stub(
    channels: tuple[grpc.aio.Channel, grpc.aio.Channel],
) -> AppsServiceAsyncStub:
    return apps_service_pb2_grpc.AppsServiceStub(channels[0])


@pytest.fixture
async def app(apps_stub: AppsServiceAsyncStub) -> TestApp:
    """A fresh app for this test."""
    return await create_test_app(apps_stub)


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    """A local endpoint for webhooks (and the Telegram Bot API)."""
    async with Sink() as endpoint:
        yield endpoint


@pytest.fixture
def harness(
    channels: tuple[grpc.aio.Channel, grpc.aio.Channel],
    app: TestApp,
    delivery_service: tuple[ServiceProcess, int],
    delivery_db: str,
) -> DeliveryHarness:
    """Stubs and helpers bound to this test's app."""
    identity, delivery = channels
    return DeliveryHarness(
        app=app,
        identity=identity_service_pb2_grpc.IdentityServiceStub(identity),
        delivery=delivery_service_pb2_grpc.DeliveryServiceStub(delivery),
        tracking_port=delivery_service[1],
        database_url=delivery_db,
    )
