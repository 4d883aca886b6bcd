"""Interrupted imports: a client gone during the merge, the identity process killed.

The process tests run their own identity process on a scratch database and SIGKILL it
mid-upload or mid-merge, start another on the same database, and check that the job ends FAILED
(the new process finds it orphaned: its lock is free), that no row of it was written, and that
uploading the same file again gives the state one upload gives, without duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc.aio
import pytest
from tidings.identity.v1 import apps_service_pb2_grpc, identity_service_pb2_grpc, import_pb2
from tidings.identity.v1 import identity_service_pb2 as pb

from tests.conftest import temporary_database
from tests.e2e.processes import ServiceProcess, start_service
from tests.identity.conftest import TestApp, create_test_app
from tests.identity.import_support import NUMBER, Job, attribute, options, standard
from tests.identity.support import new_id
from tests.polling import eventually

if TYPE_CHECKING:
    from tidings.identity.v1.identity_service_pb2_grpc import IdentityServiceAsyncStub

ROWS = 40_000


def _file(prefix: str) -> bytes:
    lines = ["id,email,score"]
    lines += [f"{prefix}-{n},user{n}@example.com,{n}" for n in range(ROWS)]
    return ("\n".join(lines) + "\n").encode()


def _options(import_id: str) -> import_pb2.ImportOptions:
    return options(standard("email"), attribute("score", NUMBER), import_id=import_id)


@dataclass
class _Identity:
    """An identity process of the test's own, a stub on it, and the app the test works in."""

    service: ServiceProcess
    stub: Any
    app: TestApp


@contextlib.asynccontextmanager
async def _identity(
    dsn: str, log_dir: Path, *, app: TestApp | None = None, env: dict[str, str] | None = None
) -> AsyncIterator[_Identity]:
    """Start identity on ``dsn`` (in a new app unless ``app`` is given); SIGKILL it on exit."""
    service = await start_service("identity", database_url=dsn, log_dir=log_dir, env=env)
    try:
        await service.wait_serving()
        async with grpc.aio.insecure_channel(service.grpc_target) as channel:
            if app is None:
                app = await create_test_app(apps_service_pb2_grpc.AppsServiceStub(channel))
            stub = identity_service_pb2_grpc.IdentityServiceStub(channel)
            yield _Identity(service, stub, app)
    finally:
        await service.kill()


async def _job(stub: IdentityServiceAsyncStub, app: TestApp, import_id: str) -> Job:
    job: Job = await stub.GetImportJob(
        import_pb2.GetImportJobRequest(import_id=import_id), metadata=app.server
    )
    return job


async def _recorded(stub: IdentityServiceAsyncStub, app: TestApp, import_id: str) -> Job | None:
    """The job, or None while it is not recorded yet."""
    try:
        return await _job(stub, app, import_id)
    except grpc.aio.AioRpcError:
        return None


async def _wait_job(
    stub: IdentityServiceAsyncStub, app: TestApp, import_id: str, state: int, within: float = 30
) -> Job:
    job = await eventually(
        lambda: _recorded(stub, app, import_id),
        lambda job: job is not None and job.state == state,
        within=within,
        interval=0.02,
        what=f"job {import_id} in state {state}",
    )
    assert job is not None
    return job


async def _count_users(stub: IdentityServiceAsyncStub, app: TestApp) -> int:
    total, token = 0, ""
    while True:
        page = await stub.ListUsers(
            pb.ListUsersRequest(page_size=1_000, page_token=token), metadata=app.server
        )
        total += len(page.users)
        token = page.next_page_token
        if not token:
            return total


async def _upload(
    stub: IdentityServiceAsyncStub, app: TestApp, import_id: str, data: bytes, hold: asyncio.Event
) -> Any:
    """ImportUsers that sends half the file, then the rest once ``hold`` is set."""
    half = len(data) // 2

    async def requests() -> AsyncIterator[import_pb2.ImportUsersRequest]:
        yield import_pb2.ImportUsersRequest(options=_options(import_id))
        yield import_pb2.ImportUsersRequest(chunk=data[:half])
        await hold.wait()
        yield import_pb2.ImportUsersRequest(chunk=data[half:])

    return stub.ImportUsers(requests(), metadata=app.server)


async def _check_recovery_and_rerun(
    dsn: str, log_dir: Path, app: TestApp, import_id: str, data: bytes
) -> None:
    """A fresh process marks the job FAILED; the file uploaded twice more lands exactly once."""
    async with _identity(dsn, log_dir, app=app) as run:
        failed = await _wait_job(run.stub, app, import_id, Job.STATE_FAILED)
        assert "upload the file again" in failed.error
        assert await _count_users(run.stub, app) == 0
        for attempt, expected in (("again", (ROWS, 0)), ("twice", (0, ROWS))):
            job = await run.stub.ImportUsers(
                _all(_options(f"{import_id}-{attempt}"), data), metadata=app.server
            )
            assert job.state == Job.STATE_SUCCEEDED, job.error
            assert (job.created, job.unchanged) == expected
        assert await _count_users(run.stub, app) == ROWS
        await run.service.stop()


async def _all(
    opts: import_pb2.ImportOptions, data: bytes
) -> AsyncIterator[import_pb2.ImportUsersRequest]:
    yield import_pb2.ImportUsersRequest(options=opts)
    for start in range(0, len(data), 1 << 20):
        yield import_pb2.ImportUsersRequest(chunk=data[start : start + (1 << 20)])


async def test_a_process_killed_mid_upload_leaves_a_failed_job_and_rerunning_lands_once(
    tmp_path: Path,
) -> None:
    data = _file(new_id())
    import_id = f"killed-{new_id()}"
    async with temporary_database() as dsn:
        async with _identity(dsn, tmp_path) as run:
            hold = asyncio.Event()
            call = await _upload(run.stub, run.app, import_id, data, hold)
            await eventually(
                lambda: _recorded(run.stub, run.app, import_id),
                lambda job: job is not None and job.state == Job.STATE_RECEIVING and job.rows > 0,
                within=30,
                what=f"job {import_id} receiving its first rows",
            )
            await run.service.kill()
            hold.set()
            with pytest.raises(grpc.aio.AioRpcError) as broken:
                await call
            # The transport died under the call: gRPC reports UNAVAILABLE, or INTERNAL
            # ("Failed execute_batch") when the client was sending its next chunk just then.
            assert broken.value.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.INTERNAL,
            ), broken.value
        await _check_recovery_and_rerun(dsn, tmp_path, run.app, import_id, data)


async def test_a_process_killed_mid_merge_writes_nothing(tmp_path: Path) -> None:
    data = _file(new_id())
    import_id = f"merge-{new_id()}"
    async with temporary_database() as dsn:
        async with _identity(dsn, tmp_path) as run:
            call = run.stub.ImportUsers(_all(_options(import_id), data), metadata=run.app.server)
            await _wait_job(run.stub, run.app, import_id, Job.STATE_APPLYING, within=60)
            await run.service.kill()
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call
        await _check_recovery_and_rerun(dsn, tmp_path, run.app, import_id, data)


async def test_a_client_gone_while_the_import_applies_does_not_stop_the_merge(
    tmp_path: Path,
) -> None:
    data = _file(new_id())
    import_id = f"left-{new_id()}"
    # A process of its own: 40,000 users would otherwise weigh on the shared one's segment
    # maintainer for the tests after this one.
    async with temporary_database() as dsn, _identity(dsn, tmp_path) as run:
        call = run.stub.ImportUsers(_all(_options(import_id), data), metadata=run.app.server)
        await _wait_job(run.stub, run.app, import_id, Job.STATE_APPLYING, within=60)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        job = await _wait_job(run.stub, run.app, import_id, Job.STATE_SUCCEEDED, within=60)
        assert (job.rows, job.created, job.rejected, job.error) == (ROWS, ROWS, 0, "")
        assert await _count_users(run.stub, run.app) == ROWS


async def test_a_service_stopping_mid_merge_exits_and_leaves_the_import_whole_or_not_at_all(
    tmp_path: Path,
) -> None:
    data = _file(new_id())
    import_id = f"stop-{new_id()}"
    async with temporary_database() as dsn:
        # No grace: the call is cancelled at once and the merge, out of the call's reach, is
        # abandoned as the process ends; it must not keep the process alive.
        no_grace = {"TIDINGS_SHUTDOWN_GRACE_SECONDS": "0"}
        async with _identity(dsn, tmp_path, env=no_grace) as run:
            call = run.stub.ImportUsers(_all(_options(import_id), data), metadata=run.app.server)
            await _wait_job(run.stub, run.app, import_id, Job.STATE_APPLYING, within=60)
            assert await run.service.stop(within=20) == 0
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call
        app = run.app
        async with _identity(dsn, tmp_path, app=app) as run:
            job = await _job(run.stub, app, import_id)
            if job.state != Job.STATE_SUCCEEDED:  # the merge may have won the race
                job = await _wait_job(run.stub, app, import_id, Job.STATE_FAILED)
                assert "upload the file again" in job.error
            expected = ROWS if job.state == Job.STATE_SUCCEEDED else 0
            assert await _count_users(run.stub, app) == expected
            await run.service.stop()
