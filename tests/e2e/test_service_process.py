"""Each service as a real process: start-up, health, reflection, metrics, migrate, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.processes import (
    NOT_SERVING,
    SERVING,
    grpcurl,
    running_service,
    start_service,
    unreachable_database_url,
)
from tests.e2e.tcp_proxy import TcpProxy

SERVICES = {
    "identity": ["tidings.identity.v1.IdentityService", "tidings.identity.v1.AppsService"],
    "journey": ["tidings.journey.v1.JourneyService"],
    "delivery": ["tidings.delivery.v1.DeliveryService"],
}

#: How long an idle service may take to exit after SIGTERM.
IDLE_STOP_SECONDS = 5.0


@pytest.mark.parametrize("name", sorted(SERVICES))
async def test_service_serves_health_reflection_and_metrics_then_stops_on_sigterm(
    name: str, scratch_db: str, tmp_path: Path
) -> None:
    async with running_service(name, database_url=scratch_db, log_dir=tmp_path) as service:
        await service.wait_serving()
        for full_name in SERVICES[name]:
            assert await service.health(full_name) == SERVING

        listed = await grpcurl(service.grpc_target, "list")
        assert listed.returncode == 0, listed.stderr
        assert set(listed.stdout.split()) == {
            *SERVICES[name],
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }

        checked = await grpcurl(service.grpc_target, "grpc.health.v1.Health/Check")
        assert checked.returncode == 0, checked.stderr
        assert json.loads(checked.stdout) == {"status": "SERVING"}

        described = await grpcurl(service.grpc_target, "describe", SERVICES[name][0])
        assert described.returncode == 0, described.stderr
        assert f"{SERVICES[name][0]} is a service" in described.stdout

        metrics = await service.metrics()
        assert (
            'grpc_server_handled_total{grpc_code="OK",grpc_method="Check",'
            'grpc_service="grpc.health.v1.Health"}'
        ) in metrics
        assert "process_resident_memory_bytes" in metrics

        started = time.monotonic()
        assert await service.stop(within=IDLE_STOP_SECONDS + 5) == 0
        assert time.monotonic() - started < IDLE_STOP_SECONDS

    lines = [json.loads(line) for line in service.log_text().splitlines()]
    assert all(line["service"] == name for line in lines)
    ready = [line for line in lines if line["msg"] == "ready"]
    assert len(ready) == 1
    assert ready[0]["grpc_port"] == service.grpc_port
    assert ready[0]["metrics_port"] == service.metrics_port
    assert lines[-1]["msg"] == "stopped"


async def test_service_without_its_database_is_not_serving_and_still_stops(
    tmp_path: Path,
) -> None:
    database_url = unreachable_database_url()
    async with running_service("identity", database_url=database_url, log_dir=tmp_path) as service:
        # Health answers (the server starts first) but says NOT_SERVING...
        await service.wait_health(NOT_SERVING)
        # ...and keeps saying it while start-up retries the database.
        await service.wait_until(
            lambda: service.log_text().count("waiting for postgres") >= 2, "a second retry"
        )
        assert await service.health() == NOT_SERVING
        assert await service.health("tidings.identity.v1.IdentityService") == NOT_SERVING
        assert '"msg": "ready"' not in service.log_text()

        started = time.monotonic()
        assert await service.stop(within=IDLE_STOP_SECONDS + 5) == 0
        assert time.monotonic() - started < IDLE_STOP_SECONDS


async def test_sigterm_reports_not_serving_to_watchers_and_honours_the_grace_period(
    scratch_db: str, tmp_path: Path
) -> None:
    """A Watch stream (like a load balancer's) hears NOT_SERVING, then is cut after the grace."""
    grace = 1.0
    async with running_service(
        "delivery",
        database_url=scratch_db,
        log_dir=tmp_path,
        env={"TIDINGS_SHUTDOWN_GRACE_SECONDS": str(grace)},
    ) as service:
        await service.wait_serving()
        async with grpc.aio.insecure_channel(service.grpc_target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            first = await watch.read()
            assert isinstance(first, health_pb2.HealthCheckResponse)
            assert first.status == SERVING

            started = time.monotonic()
            service.process.send_signal(signal.SIGTERM)
            second = await asyncio.wait_for(watch.read(), 5)
            assert isinstance(second, health_pb2.HealthCheckResponse)
            assert second.status == NOT_SERVING
            assert await service.stop(within=grace + 5) == 0
            # The open stream held the server for the grace period, and not much longer.
            assert grace <= time.monotonic() - started < grace + IDLE_STOP_SECONDS
            with pytest.raises(grpc.aio.AioRpcError):
                await watch.read()


async def test_health_follows_database_reachability(scratch_db: str, tmp_path: Path) -> None:
    """The watchdog reports NOT_SERVING while Postgres is cut off, and SERVING once it is back."""
    postgres = urlsplit(scratch_db)
    assert postgres.hostname is not None
    assert postgres.port is not None
    async with (
        TcpProxy(postgres.hostname, postgres.port) as proxy,
        running_service(
            "identity", database_url=proxy.rewrite_dsn(scratch_db), log_dir=tmp_path
        ) as service,
    ):
        await service.wait_serving()
        proxy.cut()
        await service.wait_health(NOT_SERVING, within=20)
        assert 'tidings_dependency_up{dependency="postgres"} 0.0' in await service.metrics()
        assert "unreachable: postgres" in service.log_text()

        proxy.restore()
        await service.wait_serving(within=20)
        assert 'tidings_dependency_up{dependency="postgres"} 1.0' in await service.metrics()
        assert await service.stop() == 0


async def test_migrate_subcommand_applies_migrations_and_exits(
    scratch_db: str, tmp_path: Path
) -> None:
    for _ in range(2):  # the second run finds nothing to do, and succeeds too
        process = await start_service(
            "journey", database_url=scratch_db, log_dir=tmp_path, args=("migrate",)
        )
        assert await process.wait_exit() == 0, process.log_text()

    conn = await asyncpg.connect(scratch_db)
    try:
        applied = await conn.fetch("SELECT component, version FROM schema_migrations")
    finally:
        await conn.close()
    assert {(row["component"], row["version"]) for row in applied} >= {
        ("runtime", 1),
        ("journey", 1),
    }

    unreachable = await start_service(
        "journey",
        database_url=unreachable_database_url(),
        log_dir=tmp_path,
        args=("migrate", "--wait", "1"),
    )
    assert await unreachable.wait_exit() == 1
    assert "database unreachable" in unreachable.log_text()
