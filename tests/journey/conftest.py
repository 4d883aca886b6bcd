"""Journey tests: identity and journey as real processes, each on its own scratch database.

One identity process serves the session; one journey process (engine, consumers) serves the
tests that do not restart it; tests that kill or restart journey start their own. Tests isolate
themselves by app: each gets a new app with a server key, so journeys, users and the records on
the shared topics of one test never meet another's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc.aio
import pytest
from tidings.identity.v1 import (
    apps_service_pb2_grpc,
    identity_service_pb2_grpc,
)

from tests.conftest import temporary_database
from tests.e2e.processes import ServiceProcess, running_service
from tests.identity.conftest import TestApp, create_test_app
from tests.journey.support import SendFeed, journey_process, journey_stub


@pytest.fixture(scope="session")
async def identity_service(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[ServiceProcess]:
    """Identity as a real process for the whole session."""
    async with (
        temporary_database() as dsn,
        running_service(
            "identity", database_url=dsn, log_dir=tmp_path_factory.mktemp("identity")
        ) as service,
    ):
        await service.wait_serving()
        yield service


@pytest.fixture(scope="session")
async def journey_database() -> AsyncIterator[str]:
    """The DSN of the shared journey process's scratch database (for holding its rows locked
    to line up a race)."""
    async with temporary_database() as dsn:
        yield dsn


@pytest.fixture(scope="session")
async def journey_service(
    identity_service: ServiceProcess,
    journey_database: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[ServiceProcess]:
    """Journey as a real process (engine and consumers on) for the whole session."""
    async with journey_process(
        identity_service, journey_database, tmp_path_factory.mktemp("journey")
    ) as service:
        yield service


@pytest.fixture(scope="session")
async def identity_channel_j(identity_service: ServiceProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(identity_service.grpc_target) as channel:
        yield channel


@pytest.fixture(scope="session")
async def journey_channel(journey_service: ServiceProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(journey_service.grpc_target) as channel:
        yield channel


@pytest.fixture(scope="session")
def users(identity_channel_j: grpc.aio.Channel) -> Any:
    """IdentityService stub."""
    return identity_service_pb2_grpc.IdentityServiceStub(identity_channel_j)


@pytest.fixture(scope="session")
def journeys(journey_channel: grpc.aio.Channel) -> Any:
    """JourneyService stub of the shared journey process."""
    return journey_stub(journey_channel)


@pytest.fixture
async def app(identity_channel_j: grpc.aio.Channel) -> TestApp:
    """A fresh app with a server key, for this test."""
    return await create_test_app(apps_service_pb2_grpc.AppsServiceStub(identity_channel_j))


@pytest.fixture
async def other_app(identity_channel_j: grpc.aio.Channel) -> TestApp:
    """A second app, to show tenant isolation."""
    return await create_test_app(apps_service_pb2_grpc.AppsServiceStub(identity_channel_j))


@pytest.fixture
async def feed(app: TestApp) -> AsyncIterator[SendFeed]:
    """The send requests of this test's app, from before the test acts."""
    async with SendFeed(app.app_id) as sends:
        yield sends
