"""The journey service for the runtime: its servicer, its engine and consumers, its settings.

Background tasks (when ``TIDINGS_RUN_ENGINE`` is on): ``TIDINGS_ENGINE_WORKERS`` claim loops,
the audience loader, and the consumers of ``identity.events``, ``identity.changes`` and
``delivery.receipts``. Any number of replicas may run them: claims use SKIP LOCKED and the
consumers share consumer groups.

The clock is the real one shifted by ``TIDINGS_CLOCK_OFFSET_SECONDS`` (a simulated clock for
demos and tests of day-long delays: restart the process with a larger offset and the timers
that became due fire).
"""

from __future__ import annotations

import asyncio
import functools
from datetime import datetime, timedelta
from pathlib import Path

import grpc.aio
from tidings.journey.v1 import journey_service_pb2, journey_service_pb2_grpc

from services.journey.audience import run_audience_loader
from services.journey.catalog import Catalog
from services.journey.consumers import (
    run_changes_consumer,
    run_events_consumer,
    run_receipts_consumer,
)
from services.journey.engine import Engine
from services.journey.journeys_server import JourneyServicer
from services.journey.peers import Peers
from services.journey.settings import JourneySettings
from services.runtime import service_keys
from services.runtime.app import Clock, ServiceContext, ServiceSpec, utc_now
from services.runtime.key_rotation import run_key_rotation
from services.runtime.remote_auth import RemoteKeyAuthenticator

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

JOURNEY_SERVICE = journey_service_pb2.DESCRIPTOR.services_by_name["JourneyService"].full_name

__all__ = ["JOURNEY_SERVICE", "JourneyRuntime", "offset_clock", "spec"]


def offset_clock(offset_seconds: float) -> Clock:
    """The real clock shifted by ``offset_seconds``."""
    if not offset_seconds:
        return utc_now
    offset = timedelta(seconds=offset_seconds)

    def now() -> datetime:
        return utc_now() + offset

    return now


class JourneyRuntime:
    """What the servicer and the background tasks of one process share.

    The catalog and the engine need the database pool, which exists only once start-up has
    connected: :meth:`ready` builds them on first use.
    """

    def __init__(self, settings: JourneySettings) -> None:
        self.settings = settings
        self.peers = Peers(settings, lambda: self._context().pool)
        self._catalog: Catalog | None = None
        self._engine: Engine | None = None
        self._ctx: ServiceContext | None = None

    def bind(self, ctx: ServiceContext) -> None:
        """Remember the context (called at registration)."""
        ctx.clock = offset_clock(self.settings.clock_offset_seconds)
        self._ctx = ctx

    def ready(self) -> JourneyRuntime:
        """Build the pool-bound parts if needed; returns self."""
        if self._catalog is None:
            assert self._ctx is not None
            ctx = self._ctx
            self._catalog = Catalog(ctx.pool)
            self._engine = Engine(
                self.settings, ctx.pool, self._catalog, self.peers, ctx.clock, ctx.metrics
            )
        return self

    def _context(self) -> ServiceContext:
        assert self._ctx is not None, "bind() first"
        return self._ctx

    @property
    def catalog(self) -> Catalog:
        """The journeys and definitions cache."""
        self.ready()
        assert self._catalog is not None
        return self._catalog

    @property
    def engine(self) -> Engine:
        """The engine (shared by this process's workers)."""
        self.ready()
        assert self._engine is not None
        return self._engine


async def _engine_workers(runtime: JourneyRuntime, ctx: ServiceContext) -> None:
    engine = runtime.ready().engine
    try:
        # A task group: should a loop end after all (its own errors are handled in run), its
        # siblings are cancelled with it, so a restart never adds loops to ones still running.
        async with asyncio.TaskGroup() as group:
            for _ in range(max(1, runtime.settings.engine_workers)):
                group.create_task(engine.run())
    finally:
        engine.close()


async def _key_rotation(runtime: JourneyRuntime, ctx: ServiceContext) -> None:
    await run_key_rotation(ctx, runtime.peers.box, [service_keys.SEALED])


def register(server: grpc.aio.Server, ctx: ServiceContext, *, runtime: JourneyRuntime) -> list[str]:
    """Add journey's servicer to ``server``; returns its full service name."""
    runtime.bind(ctx)
    servicer = JourneyServicer(
        ctx,
        runtime.settings,
        runtime.peers,
        lambda: runtime.catalog,
        lambda: runtime.engine,
    )
    journey_service_pb2_grpc.add_JourneyServiceServicer_to_server(servicer, server)
    return [JOURNEY_SERVICE]


def spec(settings: JourneySettings | None = None) -> ServiceSpec:
    """The journey service for the runtime; settings are read from the environment by default."""
    settings = settings or JourneySettings()
    runtime = JourneyRuntime(settings)
    background = [functools.partial(_key_rotation, runtime)]
    if settings.run_engine:
        background += [
            functools.partial(_engine_workers, runtime),
            functools.partial(run_audience_loader, runtime),
            functools.partial(run_events_consumer, runtime),
            functools.partial(run_changes_consumer, runtime),
            functools.partial(run_receipts_consumer, runtime),
        ]
    return ServiceSpec(
        name="journey",
        settings=settings,
        migrations_dir=MIGRATIONS_DIR,
        register=functools.partial(register, runtime=runtime),
        authenticator=lambda ctx: RemoteKeyAuthenticator(
            settings.identity_target, settings.admin_key
        ),
        background=background,
    )
