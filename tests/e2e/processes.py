"""Run Tidings services as real subprocesses, the way they run in production, for e2e tests.

Each service gets free ports, its own log file and an environment built from scratch (no
``TIDINGS_*`` leaks in from the developer's shell). Typical use::

    async with running_service("identity", database_url=scratch_db, log_dir=tmp_path) as svc:
        await svc.wait_serving()
        result = await grpcurl("list", svc.grpc_target)
        ...
    # leaving the block SIGKILLs the process if the test did not stop it itself

Waiting is always polling with a deadline, and a service that exits while being waited for
fails the wait at once, with the tail of its log in the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import service_logs
from tests.conftest import KAFKA_BOOTSTRAP

ROOT = Path(__file__).resolve().parents[2]
_VENV_BIN = ROOT / ".venv" / "bin"
#: The interpreter and tools of the project's virtualenv (the running one as a fallback).
BIN = _VENV_BIN if (_VENV_BIN / "python").exists() else Path(sys.executable).parent
PYTHON = BIN / "python"
GRPCURL = BIN / "grpcurl"

#: The admin key the helper gives every service it starts.
TEST_ADMIN_KEY = "e2e-admin-key"

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

_POLL_SECONDS = 0.05


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unreachable_database_url() -> str:
    """A DSN whose server refuses connections (a free local port)."""
    return f"postgresql://tidings:tidings@127.0.0.1:{free_port()}/nowhere"


class ServiceExited(AssertionError):
    """The service process ended while a test was waiting for something from it."""


@dataclass
class ServiceProcess:
    """One running service process and how to reach it.

    Attributes:
        name: Service name (``identity``, ``journey``, ``delivery``).
        process: The subprocess.
        grpc_port: Its gRPC port on 127.0.0.1.
        metrics_port: Its metrics port on 127.0.0.1.
        log_path: File receiving its stdout and stderr (JSON log lines).
    """

    name: str
    process: asyncio.subprocess.Process
    grpc_port: int
    metrics_port: int
    log_path: Path

    @property
    def grpc_target(self) -> str:
        """``host:port`` for clients and grpcurl."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def log_text(self) -> str:
        """Everything the process logged so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def _exited(self, waiting_for: str) -> ServiceExited:
        tail = "\n".join(self.log_text().splitlines()[-40:])
        return ServiceExited(
            f"{self.name} exited with {self.process.returncode} while waiting for "
            f"{waiting_for}; log tail:\n{tail}"
        )

    async def health(self, service: str = "") -> int | None:
        """The health status of ``service`` (``""``: the whole server), or None if unreachable."""
        async with grpc.aio.insecure_channel(self.grpc_target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                response = await stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=1.0
                )
            except grpc.aio.AioRpcError:
                return None
            return int(response.status)

    async def wait_until(
        self, check: Callable[[], object], what: str, within: float = 30.0
    ) -> None:
        """Poll ``check`` (sync or async) until it returns something truthy.

        Raises:
            ServiceExited: The process ended first.
            TimeoutError: ``within`` seconds passed.
        """
        deadline = time.monotonic() + within
        while True:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            if self.process.returncode is not None:
                raise self._exited(what)
            if time.monotonic() > deadline:
                tail = "\n".join(self.log_text().splitlines()[-20:])
                raise TimeoutError(f"{self.name}: no {what} within {within}s; log tail:\n{tail}")
            await asyncio.sleep(_POLL_SECONDS)

    async def wait_health(self, status: int, service: str = "", within: float = 30.0) -> None:
        """Wait until health reports ``status`` for ``service``."""

        async def reached() -> bool:
            return await self.health(service) == status

        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        await self.wait_until(reached, f"health {name}", within)

    async def wait_serving(self, within: float = 30.0) -> None:
        """Wait until the whole server reports SERVING."""
        await self.wait_health(SERVING, "", within)

    async def wait_for_log(self, text: str, within: float = 30.0) -> None:
        """Wait until ``text`` appears in the log."""
        await self.wait_until(lambda: text in self.log_text(), f"log {text!r}", within)

    async def metrics(self) -> str:
        """Scrape ``/metrics`` and return the exposition text.

        Raises:
            AssertionError: The endpoint did not answer 200.
        """
        status, body = await http_get(self.metrics_port, "/metrics")
        assert status == 200, f"/metrics answered {status}"
        return body.decode()

    async def wait_exit(self, within: float = 60.0) -> int:
        """Wait for the process to end by itself (``migrate``); returns the exit code.

        Raises:
            TimeoutError: It was still running after ``within`` seconds (it is killed then).
        """
        try:
            return await asyncio.wait_for(self.process.wait(), within)
        except TimeoutError:
            await self.kill()
            raise

    async def stop(self, sig: signal.Signals = signal.SIGTERM, within: float = 10.0) -> int:
        """Send ``sig`` and wait for the process to exit.

        Returns:
            The exit code.

        Raises:
            TimeoutError: It did not exit within ``within`` seconds (it is killed then).
        """
        if self.process.returncode is None:
            self.process.send_signal(sig)
        try:
            return await asyncio.wait_for(self.process.wait(), within)
        except TimeoutError:
            await self.kill()
            raise

    async def kill(self) -> None:
        """SIGKILL the process (no cleanup on its side) and reap it."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        await self.process.wait()


def service_env(
    *,
    grpc_port: int,
    metrics_port: int,
    database_url: str,
    kafka_bootstrap: str = KAFKA_BOOTSTRAP,
    admin_key: str = TEST_ADMIN_KEY,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a service subprocess: the caller's, minus any ``TIDINGS_*``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TIDINGS_")}
    env.update(
        PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'gen'}",
        PYTHONUNBUFFERED="1",
        TIDINGS_GRPC_HOST="127.0.0.1",
        TIDINGS_GRPC_PORT=str(grpc_port),
        TIDINGS_METRICS_HOST="127.0.0.1",
        TIDINGS_METRICS_PORT=str(metrics_port),
        TIDINGS_DATABASE_URL=database_url,
        TIDINGS_KAFKA_BOOTSTRAP=kafka_bootstrap,
        TIDINGS_ADMIN_KEY=admin_key,
        TIDINGS_LOG_FORMAT="json",
        TIDINGS_LOG_LEVEL="INFO",
    )
    env.update(extra or {})
    return env


async def start_service(
    name: str,
    *,
    database_url: str,
    log_dir: Path | None = None,
    kafka_bootstrap: str = KAFKA_BOOTSTRAP,
    admin_key: str = TEST_ADMIN_KEY,
    env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> ServiceProcess:
    """Start ``python -m services.<name>`` on free ports; does not wait for it to be ready.

    Args:
        name: ``identity``, ``journey`` or ``delivery``.
        database_url: The database it owns (usually the ``scratch_db`` fixture).
        log_dir: Where its log file goes (``tmp_path``); a new temporary directory by default.
        kafka_bootstrap: Kafka to use.
        admin_key: ``TIDINGS_ADMIN_KEY``.
        env: Extra ``TIDINGS_*`` settings, e.g. ``{"TIDINGS_RUN_OUTBOX_RELAY": "false"}``.
        args: Command-line arguments (``("migrate",)``).

    Returns:
        The process; stop it with :meth:`ServiceProcess.stop` or use :func:`running_service`.
    """
    grpc_port, metrics_port = free_port(), free_port()
    directory = log_dir or Path(tempfile.mkdtemp(prefix="tidings-e2e-"))
    log_path = directory / f"{name}-{grpc_port}.log"
    service_logs.watch(log_path)
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            str(PYTHON),
            "-m",
            f"services.{name}",
            *args,
            cwd=ROOT,
            env=service_env(
                grpc_port=grpc_port,
                metrics_port=metrics_port,
                database_url=database_url,
                kafka_bootstrap=kafka_bootstrap,
                admin_key=admin_key,
                extra=env,
            ),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
        )
    return ServiceProcess(name, process, grpc_port, metrics_port, log_path)


@contextlib.asynccontextmanager
async def running_service(
    name: str,
    *,
    database_url: str,
    log_dir: Path | None = None,
    kafka_bootstrap: str = KAFKA_BOOTSTRAP,
    admin_key: str = TEST_ADMIN_KEY,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[ServiceProcess]:
    """:func:`start_service`, and SIGKILL on exit if the test left it running."""
    service = await start_service(
        name,
        database_url=database_url,
        log_dir=log_dir,
        kafka_bootstrap=kafka_bootstrap,
        admin_key=admin_key,
        env=env,
    )
    try:
        yield service
    finally:
        await service.kill()


@dataclass(frozen=True)
class ToolResult:
    """Exit code and output of a command-line tool."""

    returncode: int
    stdout: str
    stderr: str


async def grpcurl(*args: str, within: float = 20.0) -> ToolResult:
    """Run the real ``grpcurl`` binary (plaintext) and capture its output.

    Args:
        *args: Arguments after ``-plaintext``, e.g. ``("127.0.0.1:50051", "list")``.
        within: Seconds before it is killed.
    """
    process = await asyncio.create_subprocess_exec(
        str(GRPCURL),
        "-plaintext",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), within)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return ToolResult(process.returncode, stdout.decode(), stderr.decode())


async def http_get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """A minimal HTTP/1.1 GET (``Connection: close``); returns status code and body."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body
