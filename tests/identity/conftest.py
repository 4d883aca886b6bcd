"""One identity process for the identity tests, and a fresh app (with keys) per test.

The service runs as a real subprocess on its own scratch database, reached over gRPC like a user
would. Tests isolate themselves by app: each gets a new app, so ids never collide and tests do
not depend on order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import grpc.aio
import pytest
from tidings.identity.v1 import (
    app_pb2,
    apps_service_pb2,
    apps_service_pb2_grpc,
    identity_service_pb2_grpc,
)

from tests.conftest import temporary_database, unique_name
from tests.identity.support import ChangeFeed

if TYPE_CHECKING:
    from tidings.identity.v1.apps_service_pb2_grpc import AppsServiceAsyncStub
    from tidings.identity.v1.identity_service_pb2_grpc import IdentityServiceAsyncStub
from tests.e2e.processes import TEST_ADMIN_KEY, ServiceProcess, running_service


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``key``."""
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture(scope="session")
async def identity_database() -> AsyncIterator[str]:
    """The DSN of the shared identity process's scratch database (for setting up what only
    time would produce, such as a device last active hours ago)."""
    async with temporary_database() as dsn:
        yield dsn


@pytest.fixture(scope="session")
async def identity_process(
    tmp_path_factory: pytest.TempPathFactory, identity_database: str
) -> AsyncIterator[ServiceProcess]:
    """The identity service as a real process on a scratch database, for the whole session."""
    async with running_service(
        "identity", database_url=identity_database, log_dir=tmp_path_factory.mktemp("identity")
    ) as service:
        await service.wait_serving()
        yield service


@pytest.fixture(scope="session")
async def identity_channel(identity_process: ServiceProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(identity_process.grpc_target) as channel:
        yield channel


@pytest.fixture(scope="session")
def apps_stub(identity_channel: grpc.aio.Channel) -> AppsServiceAsyncStub:
    return apps_service_pb2_grpc.AppsServiceStub(identity_channel)


@pytest.fixture(scope="session")
def identity_stub(identity_channel: grpc.aio.Channel) -> IdentityServiceAsyncStub:
    return identity_service_pb2_grpc.IdentityServiceStub(identity_channel)


ADMIN = bearer(TEST_ADMIN_KEY)


@dataclass(frozen=True)
class TestApp:
    """An app created for one test, with a server key and a client key."""

    __test__ = False  # not a test class, despite its name

    app_id: str
    server_key: str
    client_key: str

    @property
    def server(self) -> tuple[tuple[str, str], ...]:
        """Metadata for calls with the server key."""
        return bearer(self.server_key)

    @property
    def client(self) -> tuple[tuple[str, str], ...]:
        """Metadata for calls with the client key."""
        return bearer(self.client_key)


async def create_test_app(
    apps: AppsServiceAsyncStub, settings: app_pb2.AppSettings | None = None
) -> TestApp:
    """A new app with one server and one client key, created through AppsService."""
    app = await apps.CreateApp(
        apps_service_pb2.CreateAppRequest(
            app=app_pb2.App(display_name=unique_name("app"), settings=settings)
        ),
        metadata=ADMIN,
    )
    keys = {}
    for scope in (app_pb2.API_KEY_SCOPE_SERVER, app_pb2.API_KEY_SCOPE_CLIENT):
        created = await apps.CreateApiKey(
            apps_service_pb2.CreateApiKeyRequest(app_id=app.app_id, scope=scope),
            metadata=ADMIN,
        )
        keys[scope] = created.secret
    return TestApp(
        app_id=app.app_id,
        server_key=keys[app_pb2.API_KEY_SCOPE_SERVER],
        client_key=keys[app_pb2.API_KEY_SCOPE_CLIENT],
    )


@pytest.fixture
async def app(apps_stub: AppsServiceAsyncStub) -> TestApp:
    """A fresh app for this test."""
    return await create_test_app(apps_stub)


@pytest.fixture
async def feed(app: TestApp) -> AsyncIterator[ChangeFeed]:
    """The change facts of this test's app, from before the test acts."""
    async with ChangeFeed(app.app_id) as changes:
        yield changes


@pytest.fixture
async def other_app(apps_stub: AppsServiceAsyncStub) -> TestApp:
    """A second app, to show tenant isolation."""
    return await create_test_app(apps_stub)


async def status_of(call: object) -> grpc.StatusCode:
    """Await a call and return its status code (OK when it succeeds)."""
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK
