"""The service lifecycle in-process: failures that must end ``serve`` (and so the process).

The happy path, signals and health run against real subprocesses in tests/e2e.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import aiokafka.errors
import asyncpg
import grpc.aio
import pytest

from services.runtime.app import ServiceContext, ServiceFailed, ServiceSpec, _is_transient, serve
from services.runtime.migrations import MigrationError
from services.runtime.settings import ServiceSettings


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """serve() configures the root logger; give pytest's handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _spec(database_url: str, migrations: Path, **kw: object) -> ServiceSpec:
    settings = ServiceSettings(
        service_name="apptest",
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        database_url=database_url,
        run_outbox_relay=False,
        log_format="text",
    )

    def register(server: grpc.aio.Server, ctx: ServiceContext) -> list[str]:
        return []

    return ServiceSpec(
        name="apptest",
        settings=settings,
        migrations_dir=migrations,
        register=register,
        **kw,  # type: ignore[arg-type]
    )


def _migrations(directory: Path, sql: str) -> Path:
    directory.mkdir()
    (directory / "0001_init.sql").write_text(sql)
    return directory


async def test_a_failing_background_task_is_restarted(scratch_db: str, tmp_path: Path) -> None:
    runs: list[int] = []

    async def consumer(ctx: ServiceContext) -> None:
        # By the time background tasks run, the database and the producer are connected.
        runs.append(await ctx.pool.fetchval("SELECT count(*) FROM apptest_things"))
        assert ctx.producer is not None
        if len(runs) < 3:
            raise RuntimeError("consumer lost its database")
        # Third run: return, which (unlike failing) ends the service.

    spec = _spec(
        scratch_db,
        _migrations(tmp_path / "migrations", "CREATE TABLE apptest_things (id int);"),
        background=[consumer],
    )
    with pytest.raises(ServiceFailed, match="consumer"):
        await asyncio.wait_for(serve(spec), 60)
    assert runs == [0, 0, 0]


async def test_a_broken_migration_fails_start_up_without_retrying(
    scratch_db: str, tmp_path: Path
) -> None:
    spec = _spec(scratch_db, _migrations(tmp_path / "migrations", "SELEC 1;"))
    with pytest.raises(ServiceFailed, match="start-up failed: MigrationError"):
        await asyncio.wait_for(serve(spec), 60)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConnectionRefusedError(), True),
        (TimeoutError(), True),
        (asyncpg.exceptions.CannotConnectNowError("starting up"), True),
        (asyncpg.exceptions.TooManyConnectionsError("too many"), True),
        (aiokafka.errors.KafkaConnectionError(), True),
        (MigrationError("bad file"), False),
        (asyncpg.exceptions.InvalidCatalogNameError("no such database"), False),
        (asyncpg.exceptions.InvalidPasswordError("wrong password"), False),
        (ValueError("bug"), False),
    ],
)
def test_which_start_up_errors_are_retried(error: BaseException, transient: bool) -> None:
    assert _is_transient(error) is transient


def test_a_wrapped_transient_error_is_transient() -> None:
    wrapped = MigrationError("timed out")
    wrapped.__cause__ = TimeoutError()
    assert _is_transient(wrapped)
