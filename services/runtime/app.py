"""Process lifecycle of a service: start-up, readiness, dependency watchdog, graceful shutdown.

A service describes itself with a :class:`ServiceSpec` and its ``__main__`` calls :func:`main`.
:func:`serve` then runs, in this order:

1. logging, then the metrics endpoint;
2. the gRPC server with every service NOT_SERVING (health and reflection answer at once, so
   probes and ``grpcurl list`` work while the rest starts);
3. migrations, the database pool, Kafka topics and the producer, each retried with backoff while
   its dependency is unreachable (the process stays up and NOT_SERVING meanwhile);
4. the outbox relay and the service's background tasks;
5. SERVING, and one ``ready`` log line with the ports.

While serving, a watchdog probes Postgres and Kafka and flips health to NOT_SERVING while either
is unreachable, and back. SIGTERM or SIGINT (also during start-up) reports NOT_SERVING, stops
accepting calls and drains in-flight ones for ``shutdown_grace_seconds``, cancels background
tasks, stops the relay and producer and closes the pool. A clean stop returns normally (exit 0);
a background task that dies, or a start-up error retrying cannot fix, raises
:class:`ServiceFailed` (exit 1) so a supervisor restarts the process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import aiokafka.errors
import asyncpg
import grpc.aio

from services.runtime.auth import AdminKeyAuthenticator, Authenticator
from services.runtime.db import DataPlaneError, create_pool, database_reachable
from services.runtime.errors import Unavailable
from services.runtime.grpc_server import Health, bind, create_server, enable_reflection
from services.runtime.interceptors import ServiceInterceptor
from services.runtime.kafka import ALL_TOPICS, KafkaProbe, Producer, ensure_topics
from services.runtime.logging import configure_logging
from services.runtime.metrics import Metrics, MetricsServer
from services.runtime.migrations import migrate, sources_for
from services.runtime.outbox import OutboxRelay
from services.runtime.settings import ServiceSettings

__all__ = ["Clock", "ServiceContext", "ServiceFailed", "ServiceSpec", "main", "serve", "utc_now"]

_T = TypeVar("_T")

#: Returns the current time; injectable so time-driven logic is testable without sleeping.
Clock = Callable[[], datetime]

#: Start-up retry backoff: first wait, and the cap it doubles up to.
_RETRY_FIRST_SECONDS = 0.5
_RETRY_MAX_SECONDS = 5.0
#: Restart backoff of failing background tasks, reset once a run lasted this long.
_BACKGROUND_RETRY_MAX_SECONDS = 30.0
_BACKGROUND_HEALTHY_SECONDS = 60.0
#: Upper bounds on shutdown steps that wait on the network, so SIGTERM always ends the process.
_STOP_STEP_SECONDS = 5.0


def utc_now() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class ServiceFailed(Exception):
    """The service cannot go on (a background task died, or start-up failed for good)."""


@dataclass(eq=False)
class ServiceContext:
    """What a service's servicers and background tasks get from the runtime.

    ``pool`` and ``producer`` exist only once start-up has connected them; servicers are built
    before that (the server must start first so health answers), so they keep the context and
    read ``ctx.pool`` per call. Before start-up finishes the interceptor already answers keyed
    calls with UNAVAILABLE, so in practice a handler never sees the error these raise.

    Attributes:
        settings: The service's settings.
        log: The service's logger.
        metrics: Process metrics; register service metrics on ``metrics.registry``.
        clock: Current time.
    """

    settings: ServiceSettings
    log: logging.Logger
    metrics: Metrics
    clock: Clock = utc_now
    _pool: asyncpg.Pool | None = field(default=None, repr=False)
    _producer: Producer | None = field(default=None, repr=False)

    @property
    def pool(self) -> asyncpg.Pool:
        """The service database's connection pool.

        Raises:
            Unavailable: Before start-up has opened it.
        """
        if self._pool is None:
            raise Unavailable("the database is not connected yet", reason="SERVICE_STARTING")
        return self._pool

    @property
    def producer(self) -> Producer:
        """The Kafka producer.

        Raises:
            Unavailable: Before start-up has started it.
        """
        if self._producer is None:
            raise Unavailable("Kafka is not connected yet", reason="SERVICE_STARTING")
        return self._producer


@dataclass
class ServiceSpec:
    """Everything the runtime needs to know to run one service.

    Attributes:
        name: Service name (``identity``): logs, ``ErrorInfo.domain``, migrations, Kafka client.
        settings: The service's settings (a :class:`ServiceSettings` subclass with its defaults).
        migrations_dir: The service's numbered SQL migrations (``services/<svc>/migrations``).
        register: Adds the servicers to the server and returns their full service names (for
            health and reflection). Called before the server starts, before the pool exists.
        authenticator: Builds the authenticator from the context; by default only the admin
            key is accepted.
        background: Long-running tasks (consumers, schedulers) started once dependencies are
            up and cancelled on shutdown. One that ends or fails stops the process (exit 1).
        probe_interval_seconds: How often the watchdog probes Postgres and Kafka.
    """

    name: str
    settings: ServiceSettings
    migrations_dir: Path
    register: Callable[[grpc.aio.Server, ServiceContext], Sequence[str]]
    authenticator: Callable[[ServiceContext], Authenticator] | None = None
    background: Sequence[Callable[[ServiceContext], Awaitable[None]]] = ()
    probe_interval_seconds: float = 2.0


def _is_transient(exc: BaseException) -> bool:
    """Whether start-up should retry after ``exc``: the dependency is merely not answering.

    A data-plane error wrapping a transient one (``ensure_topics`` timing out) is transient too.
    """
    if isinstance(exc, DataPlaneError) and exc.__cause__ is not None:
        return _is_transient(exc.__cause__)
    if isinstance(exc, aiokafka.errors.KafkaError):
        return bool(getattr(exc, "retriable", False)) or isinstance(
            exc, aiokafka.errors.KafkaConnectionError
        )
    return isinstance(
        exc,
        OSError  # connection refused, DNS failure, timeouts (TimeoutError is an OSError)
        | asyncpg.PostgresConnectionError
        | asyncpg.exceptions.CannotConnectNowError  # the server is starting or recovering
        | asyncpg.exceptions.AdminShutdownError
        | asyncpg.exceptions.CrashShutdownError
        | asyncpg.exceptions.TooManyConnectionsError,
    )


async def _retrying(log: logging.Logger, what: str, step: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``step`` until it succeeds, waiting with capped exponential backoff between tries.

    Errors that are not transient propagate at once: retrying a bad migration helps no one.
    """
    delay = _RETRY_FIRST_SECONDS
    while True:
        try:
            return await step()
        except Exception as exc:
            if not _is_transient(exc):
                raise
            log.warning(
                "waiting for %s: %s; retrying in %.1fs",
                what,
                type(exc).__name__,
                delay,
                extra={"dependency": what, "retry_in_s": delay},
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, _RETRY_MAX_SECONDS)


async def _migrate(spec: ServiceSpec, log: logging.Logger) -> list[str]:
    applied = await migrate(spec.settings.database_url, sources_for(spec.name, spec.migrations_dir))
    if applied:
        log.info("applied %d migration(s)", len(applied), extra={"migrations": applied})
    return applied


class _ServiceProcess:
    """One run of :func:`serve`; holds what shutdown must undo."""

    def __init__(self, spec: ServiceSpec) -> None:
        self.spec = spec
        settings = spec.settings
        self.log = configure_logging(
            spec.name, log_format=settings.log_format, level=settings.log_level
        )
        self.metrics = Metrics()
        self.ctx = ServiceContext(settings=settings, log=self.log, metrics=self.metrics)
        self.stop_requested = asyncio.Event()
        self.ready = False
        self.relay: OutboxRelay | None = None
        self.relay_task: asyncio.Task[None] | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.watchdog: asyncio.Task[None] | None = None

    def request_stop(self, signum: int) -> None:
        if not self.stop_requested.is_set():
            self.log.info("received %s, shutting down", signal.Signals(signum).name)
        self.stop_requested.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for signum in signals:
            loop.add_signal_handler(signum, self.request_stop, signum)
        settings = self.spec.settings
        metrics_server = MetricsServer(self.metrics, settings.metrics_host, settings.metrics_port)
        try:
            await metrics_server.start()
            await self._run_server(metrics_server)
        finally:
            await metrics_server.stop()
            for signum in signals:
                loop.remove_signal_handler(signum)
        self.log.info("stopped")

    async def _run_server(self, metrics_server: MetricsServer) -> None:
        spec, settings, log = self.spec, self.spec.settings, self.log
        authenticator = (
            spec.authenticator(self.ctx)
            if spec.authenticator is not None
            else AdminKeyAuthenticator(settings.admin_key)
        )
        interceptor = ServiceInterceptor(
            domain=spec.name,
            authenticator=authenticator,
            metrics=self.metrics,
            log=log,
            ready=lambda: self.ready,
        )
        server = create_server([interceptor])
        services = list(spec.register(server, self.ctx))
        health = await Health.register(server, services)
        enable_reflection(server, services)
        grpc_port = bind(server, settings.grpc_host, settings.grpc_port)
        await server.start()
        log.info(
            "starting: gRPC on %s:%d (NOT_SERVING), metrics on %s:%d",
            settings.grpc_host,
            grpc_port,
            settings.metrics_host,
            metrics_server.port,
            extra={"grpc_port": grpc_port, "metrics_port": metrics_server.port},
        )
        try:
            if await self._until_stop_requested(self._connect()):
                self._start_tasks()
                self.ready = True
                await health.set_serving(True)
                log.info(
                    "ready",
                    extra={
                        "grpc_port": grpc_port,
                        "metrics_port": metrics_server.port,
                        "services": services,
                    },
                )
                self.watchdog = asyncio.create_task(self._watch(health), name="watchdog")
                await self._supervise()
        except ServiceFailed:
            raise
        except Exception as exc:
            log.exception("start-up failed")
            raise ServiceFailed(f"start-up failed: {type(exc).__name__}") from exc
        finally:
            await self._shut_down(server, health)

    async def _until_stop_requested(self, work: Awaitable[None]) -> bool:
        """Run ``work`` unless a stop is requested first; True if it finished."""
        task = asyncio.ensure_future(work)
        stop = asyncio.create_task(self.stop_requested.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            task.result()  # re-raise a start-up error
            return True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False

    async def _connect(self) -> None:
        """Migrate, open the pool, create topics, start the producer; each retried."""
        spec, settings, log = self.spec, self.spec.settings, self.log
        await _retrying(log, "postgres (migrations)", lambda: _migrate(spec, log))
        self.ctx._pool = await _retrying(
            log,
            "postgres (pool)",
            lambda: create_pool(
                settings.database_url,
                min_size=settings.db_pool_min,
                max_size=settings.db_pool_max,
            ),
        )
        await _retrying(
            log, "kafka (topics)", lambda: ensure_topics(settings.kafka_bootstrap, ALL_TOPICS)
        )
        self.ctx._producer = await _retrying(log, "kafka (producer)", self._start_producer)

    async def _start_producer(self) -> Producer:
        producer = Producer(self.spec.settings.kafka_bootstrap, client_id=self.spec.name)
        try:
            await producer.start()
        except BaseException:
            # A half-started client keeps sockets and tasks; release them before retrying.
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        return producer

    def _start_tasks(self) -> None:
        if self.spec.settings.run_outbox_relay:
            self.relay = OutboxRelay(
                self.ctx.pool, self.spec.settings.kafka_bootstrap, service=self.spec.name
            )
            self.relay_task = asyncio.create_task(self.relay.run(), name="outbox-relay")
            self.tasks.append(self.relay_task)
        for index, factory in enumerate(self.spec.background):
            name = getattr(factory, "__qualname__", f"background-{index}")
            self.tasks.append(asyncio.create_task(self._restarting(name, factory), name=name))

    async def _restarting(
        self, name: str, factory: Callable[[ServiceContext], Awaitable[None]]
    ) -> None:
        """Run a background task; when it fails, log it and start it again after a backoff.

        A consumer that loses Postgres or Kafka fails, but the outage passes: restarting it here
        keeps the process up (reported NOT_SERVING by the watchdog meanwhile) instead of trading
        an outage for a crash loop. Returning normally still ends the process (see _supervise).
        """
        delay = _RETRY_FIRST_SECONDS
        while True:
            started = asyncio.get_running_loop().time()
            try:
                await factory(self.ctx)
                return
            except Exception:
                self.log.exception("background task %s failed; restarting in %.1fs", name, delay)
            if asyncio.get_running_loop().time() - started > _BACKGROUND_HEALTHY_SECONDS:
                delay = _RETRY_FIRST_SECONDS
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKGROUND_RETRY_MAX_SECONDS)

    async def _supervise(self) -> None:
        """Wait for a stop request; a task that ends before that is a failure of the process."""
        stop = asyncio.create_task(self.stop_requested.wait())
        try:
            done, _ = await asyncio.wait({stop, *self.tasks}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        for task in done:
            if task is stop:
                continue
            exc = None if task.cancelled() else task.exception()
            self.log.error(
                "background task %s ended unexpectedly",
                task.get_name(),
                exc_info=exc,
            )
            raise ServiceFailed(f"background task {task.get_name()} ended")

    async def _watch(self, health: Health) -> None:
        """Keep health in step with Postgres and Kafka reachability."""
        pool = self.ctx.pool
        kafka = KafkaProbe(self.spec.settings.kafka_bootstrap)
        try:
            await self._watch_with(health, pool, kafka)
        finally:
            await kafka.close()

    async def _watch_with(self, health: Health, pool: asyncpg.Pool, kafka: KafkaProbe) -> None:
        while True:
            await asyncio.sleep(self.spec.probe_interval_seconds)
            try:
                db_ok, kafka_ok = await asyncio.gather(database_reachable(pool), kafka.reachable())
            except Exception:
                # The probes are meant never to raise; if one does, a broken probe must not
                # leave health stuck, so count it as unreachable.
                self.log.exception("dependency probe failed")
                db_ok = kafka_ok = False
            self.metrics.dependency_up.labels("postgres").set(int(db_ok))
            self.metrics.dependency_up.labels("kafka").set(int(kafka_ok))
            if await health.set_serving(db_ok and kafka_ok):
                if db_ok and kafka_ok:
                    self.log.info("dependencies reachable again: SERVING")
                else:
                    down = [
                        name for name, ok in (("postgres", db_ok), ("kafka", kafka_ok)) if not ok
                    ]
                    self.log.warning(
                        "unreachable: %s; NOT_SERVING", ", ".join(down), extra={"down": down}
                    )

    async def _shut_down(self, server: grpc.aio.Server, health: Health) -> None:
        """Undo start-up in reverse; every step bounded so the process always exits."""
        settings, log = self.spec.settings, self.log
        if self.watchdog is not None:
            self.watchdog.cancel()  # it must not report SERVING again while we drain
        await health.shut_down()
        # Stops accepting at once; in-flight calls get the grace period, then are cancelled.
        await server.stop(grace=settings.shutdown_grace_seconds)
        for task in self.tasks:
            if task is not self.relay_task:
                task.cancel()
        if self.relay is not None and self.relay_task is not None:
            # Let the relay finish the batch in hand rather than cancel it mid-publish.
            await _bounded(log, "outbox relay stop", self.relay.stop())
            await asyncio.wait({self.relay_task}, timeout=_STOP_STEP_SECONDS)
            self.relay_task.cancel()
        await asyncio.gather(
            *(task for task in [self.watchdog, *self.tasks] if task is not None),
            return_exceptions=True,
        )
        if self.ctx._producer is not None:
            await _bounded(log, "producer stop", self.ctx._producer.stop())
        if self.ctx._pool is not None:
            pool = self.ctx._pool
            if not await _bounded(log, "pool close", pool.close()):
                pool.terminate()


async def _bounded(log: logging.Logger, what: str, work: Awaitable[None]) -> bool:
    """Await ``work`` for at most a few seconds; False (and a warning) if it failed or hung."""
    try:
        async with asyncio.timeout(_STOP_STEP_SECONDS):
            await work
        return True
    except Exception as exc:
        log.warning("%s did not complete: %s", what, type(exc).__name__)
        return False


async def serve(spec: ServiceSpec) -> None:
    """Run the service until SIGTERM/SIGINT (see the module docstring for the whole lifecycle).

    Args:
        spec: The service to run.

    Raises:
        ServiceFailed: A background task ended or start-up failed for good.
    """
    await _ServiceProcess(spec).run()


async def _migrate_only(spec: ServiceSpec, wait_seconds: float) -> None:
    settings = spec.settings
    log = configure_logging(spec.name, log_format=settings.log_format, level=settings.log_level)
    try:
        async with asyncio.timeout(wait_seconds):
            applied = await _retrying(log, "postgres (migrations)", lambda: _migrate(spec, log))
    except TimeoutError:
        raise ServiceFailed(f"database unreachable for {wait_seconds:g}s") from None
    log.info("database up to date (%d migration(s) applied now)", len(applied))


def main(spec: ServiceSpec, argv: Sequence[str] | None = None) -> None:
    """Command line of a service: ``serve`` (the default) or ``migrate``.

    ``migrate`` applies pending migrations and exits, waiting up to ``--wait`` seconds for the
    database to accept connections.

    Args:
        spec: The service.
        argv: Arguments without the program name; ``sys.argv[1:]`` by default.
    """
    parser = argparse.ArgumentParser(prog=f"python -m services.{spec.name}")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the service (default)")
    migrate_parser = commands.add_parser("migrate", help="apply pending migrations and exit")
    migrate_parser.add_argument(
        "--wait",
        type=float,
        default=30.0,
        help="seconds to wait for the database to accept connections (default 30)",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "migrate":
            asyncio.run(_migrate_only(spec, args.wait))
        else:
            asyncio.run(serve(spec))
    except ServiceFailed as exc:
        logging.getLogger(f"tidings.{spec.name}").critical("exiting: %s", exc)
        sys.exit(1)
    except Exception:
        logging.getLogger(f"tidings.{spec.name}").critical("exiting on error", exc_info=True)
        sys.exit(1)
