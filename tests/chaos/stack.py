"""A private PostgreSQL and Kafka for the fault suite, which restarts them.

The shared stack (``scripts/stack.sh``, 127.0.0.1:55432 and :19092) serves every engineer and
every other test; restarting it would break them. The chaos suite starts its own cluster and
broker from the same binaries (Debian's PostgreSQL, the Kafka jars ``stack.sh`` fetched into
``.stack/kafka/libs``) on free ports with data in a temporary folder, restarts *those*, and
deletes them at the end.

The broker advertises the address of a :class:`~tests.e2e.tcp_proxy.TcpProxy` in front of it,
so every Kafka connection (bootstrap and partition leaders alike) goes through the proxy and a
test can cut or slow the whole data plane's Kafka traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from tests.e2e.processes import ROOT, free_port
from tests.e2e.tcp_proxy import TcpProxy

KAFKA_LIBS = Path(os.environ.get("TIDINGS_STACK_DIR", ROOT / ".stack")) / "kafka" / "libs"
PG_USER = "tidings"
PG_PASSWORD = "tidings"


class StackError(RuntimeError):
    """The private cluster or broker could not be set up."""


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if not found:
        raise StackError("no PostgreSQL binaries under /usr/lib/postgresql (run make stack)")
    return found[-1]


def _as_postgres(args: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root, as stack.sh knows.
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


async def _run(args: list[str], within: float = 120.0) -> str:
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), within)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    text = out.decode(errors="replace")
    if process.returncode != 0:
        raise StackError(f"{' '.join(args[:4])}... exited {process.returncode}: {text[-2000:]}")
    return text


async def _wait(check: object, what: str, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            if await check():  # type: ignore[operator]
                return
        except (OSError, asyncpg.PostgresError):
            pass
        if time.monotonic() > deadline:
            raise StackError(f"{what} not ready within {within}s")
        await asyncio.sleep(0.2)


class PrivatePostgres:
    """One PostgreSQL cluster in a temporary folder, on a free port."""

    def __init__(self, base: Path) -> None:
        self.dir = base / "pg"
        self.data = self.dir / "data"
        self.port = free_port()
        self._bin = _pg_bin()

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.port}/postgres"

    def dsn(self, database: str) -> str:
        return f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.port}/{database}"

    async def init(self) -> None:
        self.dir.mkdir(parents=True)
        (self.dir / "run").mkdir()
        pwfile = self.dir / "pwfile"
        pwfile.write_text(PG_PASSWORD + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
            shutil.chown(self.dir / "run", "postgres")
            shutil.chown(pwfile, "postgres")
        await _run(
            _as_postgres(
                [
                    str(self._bin / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    PG_USER,
                    f"--pwfile={pwfile}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ]
            )
        )
        pwfile.unlink()
        # Small and fast; fsync off loses data only if the OS crashes, never when Postgres
        # itself is killed, which is what the suite does.
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.dir / 'run'}'\n"
                "max_connections = 300\nshared_buffers = 128MB\nfsync = off\n"
                "full_page_writes = off\nsynchronous_commit = on\n"
            )

    async def start(self) -> None:
        await _run(
            _as_postgres(
                [
                    str(self._bin / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.dir / "postgres.log"),
                    "-w",
                    "-t",
                    "120",
                    "start",
                ]
            )
        )

        async def answers() -> bool:
            conn = await asyncpg.connect(self.admin_dsn, timeout=2)
            await conn.close()
            return True

        await _wait(answers, "private postgres", 60)

    async def stop(self, mode: str = "fast") -> None:
        """``fast`` (clean) or ``immediate`` (as if the server crashed: recovery on start)."""
        await _run(
            _as_postgres(
                [str(self._bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"]
            )
        )

    async def restart(self, mode: str = "immediate") -> None:
        await self.stop(mode)
        await self.start()

    async def create_database(self) -> str:
        """A new empty database; its DSN."""
        name = f"c_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.dsn(name)


class PrivateKafka:
    """A single-node KRaft broker in a temporary folder, behind a TCP proxy."""

    def __init__(self, base: Path) -> None:
        self.dir = base / "kafka"
        self.port = free_port()
        self.controller_port = free_port()
        self.proxy = TcpProxy("127.0.0.1", self.port)
        self._process: subprocess.Popen[bytes] | None = None
        self._conf = self.dir / "server.properties"

    @property
    def bootstrap(self) -> str:
        """What services and clients use: the proxy (which the broker advertises)."""
        return f"127.0.0.1:{self.proxy.port}"

    def _java(self, *args: str) -> list[str]:
        return [
            "java",
            "-Xms128m",
            "-Xmx512m",
            "-XX:+UseG1GC",
            "-XX:TieredStopAtLevel=1",
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
            "-cp",
            f"{KAFKA_LIBS}/*",
            *args,
        ]

    async def init(self) -> None:
        if not (KAFKA_LIBS / ".complete").exists():
            raise StackError(f"no Kafka jars in {KAFKA_LIBS}: run `make stack` once")
        await self.proxy.start()
        self.dir.mkdir(parents=True)
        self._conf.write_text(
            "process.roles=broker,controller\nnode.id=1\n"
            f"controller.quorum.bootstrap.servers=127.0.0.1:{self.controller_port}\n"
            f"listeners=PLAINTEXT://127.0.0.1:{self.port},"
            f"CONTROLLER://127.0.0.1:{self.controller_port}\n"
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.proxy.port}\n"
            "controller.listener.names=CONTROLLER\ninter.broker.listener.name=PLAINTEXT\n"
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n"
            f"log.dirs={self.dir / 'data'}\nnum.partitions=12\n"
            "auto.create.topics.enable=false\noffsets.topic.replication.factor=1\n"
            "offsets.topic.num.partitions=12\ntransaction.state.log.replication.factor=1\n"
            "transaction.state.log.min.isr=1\n"
            "share.coordinator.state.topic.replication.factor=1\n"
            "share.coordinator.state.topic.min.isr=1\ngroup.initial.rebalance.delay.ms=0\n"
        )
        await _run(
            self._java(
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "-t",
                "chaos" + uuid.uuid4().hex[:17],
                "-c",
                str(self._conf),
            )
        )

    async def start(self) -> None:
        log = (self.dir / "kafka.log").open("ab")
        self._process = subprocess.Popen(  # noqa: ASYNC220 - a long-lived child, not awaited
            self._java("kafka.Kafka", str(self._conf)),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        await _wait(self._answers_metadata, "private kafka", 120)

    async def _answers_metadata(self) -> bool:
        from aiokafka.admin import AIOKafkaAdminClient

        if self._process is not None and self._process.poll() is not None:
            raise StackError(f"private kafka exited; see {self.dir / 'kafka.log'}")
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=3000)
        quiet = logging.getLogger("aiokafka")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # "unable to connect" while it boots is expected
        try:
            await admin.start()
            await admin.list_topics()
            return True
        except Exception:
            return False
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
            quiet.setLevel(level)

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """SIGTERM (controlled shutdown) or SIGKILL (a crash: log recovery on start)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        deadline = time.monotonic() + 60
        while process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
            await asyncio.sleep(0.1)

    async def restart(self, sig: signal.Signals = signal.SIGTERM) -> None:
        await self.stop(sig)
        await self.start()

    async def close(self) -> None:
        await self.stop(signal.SIGKILL)
        await self.proxy.stop()


class PrivateStack:
    """The private cluster and broker of one chaos session."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="tidings-chaos-"))
        # The postgres system user must be able to reach its data folder.
        self.base.chmod(0o755)
        self.postgres = PrivatePostgres(self.base)
        self.kafka = PrivateKafka(self.base)

    async def start(self) -> None:
        await self.postgres.init()
        await asyncio.gather(self.postgres.start(), self._start_kafka())

    async def _start_kafka(self) -> None:
        await self.kafka.init()
        await self.kafka.start()

    async def close(self) -> None:
        await self.kafka.close()
        with contextlib.suppress(StackError):
            await self.postgres.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


@contextlib.asynccontextmanager
async def private_stack() -> AsyncIterator[PrivateStack]:
    """Start a private stack; tear it down (processes and data) on exit."""
    stack = PrivateStack()
    try:
        await stack.start()
        yield stack
    finally:
        await stack.close()
