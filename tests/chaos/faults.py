"""A seeded fault schedule and the runner that plays it while a scenario makes progress.

A schedule is a list of :class:`Fault` s drawn from a seed. Each fires when the scenario's
progress (a fraction of the work visible at the sinks) passes its mark, so a kill lands while
work is in flight whatever the machine's speed; faults run one after the other, each to its end
(a killed process is replaced, a paused one resumed, a cut connection restored). The same seed
gives the same faults in the same order at the same progress marks.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from tests.chaos.cluster import Cluster
from tests.e2e.tcp_proxy import TcpProxy

__all__ = ["Fault", "FaultRunner", "plan", "running"]

KILL = "kill"  # SIGKILL a member, start a replacement after `hold` seconds
PAUSE = "pause"  # SIGSTOP a member for `hold` seconds, then SIGCONT
BROKER_RESTART = "broker-restart"  # the private Kafka broker, SIGTERM then start
BROKER_CRASH = "broker-crash"  # the private Kafka broker, SIGKILL then start
PG_RESTART = "postgres-restart"  # the private cluster, immediate stop (a crash) then start
CUT = "cut"  # a proxy drops every connection for `hold` seconds
SLOW = "slow"  # a proxy adds `latency` seconds per chunk for `hold` seconds


@dataclass(frozen=True)
class Fault:
    """One fault: what, to whom, when (progress fraction) and for how long."""

    at: float
    kind: str
    target: str = ""
    hold: float = 0.0
    latency: float = 0.0

    def __str__(self) -> str:
        extra = f" latency={self.latency:.2f}s" if self.kind == SLOW else ""
        target = f" {self.target}" if self.target else ""
        return f"{self.kind}{target} at {self.at:.0%} for {self.hold:.1f}s{extra}"


def plan(
    rng: random.Random,
    *,
    kills: tuple[str, ...] = (),
    pauses: tuple[str, ...] = (),
    kill_targets: tuple[str, ...] = (),
    broker: tuple[str, ...] = (),
    postgres: int = 0,
    cuts: tuple[str, ...] = (),
    slows: tuple[str, ...] = (),
    span: tuple[float, float] = (0.05, 0.85),
    kill_count: int = 0,
) -> list[Fault]:
    """Draw a schedule.

    Args:
        rng: The scenario's random source (from the run's seed).
        kills: Labels to SIGKILL, one fault each.
        kill_count: Further kills of labels drawn from ``kill_targets``.
        pauses: Labels to SIGSTOP/SIGCONT.
        broker: One broker fault per entry: ``BROKER_RESTART`` or ``BROKER_CRASH``.
        postgres: Number of Postgres restarts.
        cuts: Proxy names whose connections are cut for a while.
        slows: Proxy names that get slow for a while.
        span: Progress marks are drawn in this range.
    """
    faults: list[Fault] = []

    def at() -> float:
        return round(rng.uniform(*span), 3)

    victims = list(kills) + [rng.choice(kill_targets) for _ in range(kill_count)]
    faults += [Fault(at(), KILL, label, round(rng.uniform(0.0, 2.0), 2)) for label in victims]
    faults += [Fault(at(), PAUSE, label, round(rng.uniform(1.0, 4.0), 2)) for label in pauses]
    faults += [Fault(at(), kind) for kind in broker]
    faults += [Fault(at(), PG_RESTART) for _ in range(postgres)]
    faults += [Fault(at(), CUT, name, round(rng.uniform(0.5, 3.0), 2)) for name in cuts]
    faults += [
        Fault(at(), SLOW, name, round(rng.uniform(1.0, 4.0), 2), round(rng.uniform(0.02, 0.2), 3))
        for name in slows
    ]
    return sorted(faults, key=lambda f: f.at)


@dataclass
class FaultRunner:
    """Plays a schedule against a cluster as progress advances.

    Args:
        cluster: The processes (and the private stack) to hurt.
        faults: The schedule.
        progress: Returns the scenario's progress, 0-1.
        proxies: Proxies by name, for ``CUT`` and ``SLOW``.
    """

    cluster: Cluster
    faults: list[Fault]
    progress: Callable[[], Awaitable[float]]
    proxies: dict[str, TcpProxy] = field(default_factory=dict)
    #: What happened, in order: (monotonic start, monotonic end, description).
    log: list[tuple[float, float, str]] = field(default_factory=list)
    #: Seconds each member was down or frozen, by label.
    downtime: dict[str, float] = field(default_factory=dict)

    @property
    def fired(self) -> int:
        return len(self.log)

    def describe(self) -> list[str]:
        return [text for _, _, text in self.log]

    async def run(self, within: float = 600.0, stall: float = 20.0) -> None:
        """Fire every fault once its progress mark is reached, or once progress has stood
        still for ``stall`` seconds (so all of them fire in the end)."""
        deadline = time.monotonic() + within
        for fault in self.faults:
            last, moved = -1.0, time.monotonic()
            while (done := await self.progress()) < fault.at and done < 1.0:
                if done != last:
                    last, moved = done, time.monotonic()
                elif time.monotonic() - moved > stall:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"progress stuck at {done:.1%} before {fault}")
                await asyncio.sleep(0.05)
            started = time.monotonic()
            print(f"[chaos] fault: {fault} at progress {done:.1%}", flush=True)
            await self._fire(fault)
            self.log.append((started, time.monotonic(), f"{fault} (progress {done:.1%})"))

    async def _fire(self, fault: Fault) -> None:
        cluster = self.cluster
        if fault.kind == KILL:
            started = time.monotonic()
            await cluster.kill(fault.target)
            await asyncio.sleep(fault.hold)
            await cluster.restart(fault.target)
            self._down(fault.target, time.monotonic() - started)
        elif fault.kind == PAUSE:
            cluster.stop(fault.target)
            try:
                await asyncio.sleep(fault.hold)
            finally:
                cluster.cont(fault.target)
            self._down(fault.target, fault.hold)
        elif fault.kind in (BROKER_RESTART, BROKER_CRASH):
            sig = signal.SIGKILL if fault.kind == BROKER_CRASH else signal.SIGTERM
            await cluster.stack.kafka.restart(sig)
        elif fault.kind == PG_RESTART:
            await cluster.stack.postgres.restart("immediate")
        elif fault.kind == CUT:
            proxy = self.proxies[fault.target]
            proxy.cut()
            try:
                await asyncio.sleep(fault.hold)
            finally:
                proxy.restore()
        elif fault.kind == SLOW:
            proxy = self.proxies[fault.target]
            proxy.latency = fault.latency
            try:
                await asyncio.sleep(fault.hold)
            finally:
                proxy.latency = 0.0
        else:  # pragma: no cover - a typo in a schedule
            raise ValueError(f"unknown fault {fault.kind}")

    def _down(self, label: str, seconds: float) -> None:
        self.downtime[label] = self.downtime.get(label, 0.0) + seconds


@contextlib.asynccontextmanager
async def running(runner: FaultRunner, within: float = 600.0) -> AsyncIterator[FaultRunner]:
    """Run the schedule in the background; on exit, wait for it (its errors surface)."""
    task = asyncio.create_task(runner.run(within))
    try:
        yield runner
    except BaseException:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise
    await task
