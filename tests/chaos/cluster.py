"""The services of a chaos run as real processes on the private stack, restartable by label.

Each member remembers how it was started (service, database, environment), so a fault can
SIGKILL it and start an identical replacement, or SIGSTOP and later SIGCONT it, by label
(``delivery-2``, ``journey-1``...).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass, field
from pathlib import Path

from tests.chaos.stack import PrivateStack
from tests.e2e.processes import TEST_ADMIN_KEY, ServiceProcess, start_service

__all__ = ["ADMIN", "Cluster", "Member"]

#: Metadata of admin calls to the cluster's identity.
ADMIN = (("authorization", f"Bearer {TEST_ADMIN_KEY}"),)


@dataclass
class Member:
    """One service process and how to start it again."""

    label: str
    service: str
    database_url: str
    env: dict[str, str]
    process: ServiceProcess
    #: Log lines that mean the member is ready to work (besides health SERVING).
    ready_logs: tuple[str, ...] = ()
    stopped: bool = False
    generations: int = 1

    @property
    def target(self) -> str:
        return self.process.grpc_target


@dataclass
class Cluster:
    """The processes of one run; :meth:`close` kills whatever is left."""

    stack: PrivateStack
    log_dir: Path
    members: dict[str, Member] = field(default_factory=dict)
    _started: dict[str, int] = field(default_factory=dict)

    def next_label(self, service: str) -> str:
        """``<service>-<n>``, never reused in a run (members come and go)."""
        self._started[service] = self._started.get(service, 0) + 1
        return f"{service}-{self._started[service]}"

    async def _spawn(
        self, service: str, database_url: str, env: dict[str, str], ready_logs: tuple[str, ...]
    ) -> ServiceProcess:
        process = await start_service(
            service,
            database_url=database_url,
            log_dir=self.log_dir,
            kafka_bootstrap=self.stack.kafka.bootstrap,
            env=env,
        )
        # A loaded 2-core machine with a broker that may be restarting: be patient.
        await process.wait_serving(within=180)
        for line in ready_logs:
            await process.wait_for_log(line, within=180)
        return process

    async def start(
        self,
        label: str,
        service: str,
        database_url: str,
        env: dict[str, str] | None = None,
        ready_logs: tuple[str, ...] = (),
    ) -> Member:
        """Start a member and wait until it serves."""
        environment = dict(env or {})
        process = await self._spawn(service, database_url, environment, ready_logs)
        member = Member(label, service, database_url, environment, process, ready_logs)
        self.members[label] = member
        return member

    def of(self, service: str) -> list[Member]:
        return [m for m in self.members.values() if m.service == service]

    async def kill(self, label: str) -> None:
        """SIGKILL (no cleanup on its side)."""
        member = self.members[label]
        if member.stopped:
            self.cont(label)
        await member.process.kill()

    async def restart(self, label: str) -> None:
        """Start a replacement of a killed member (same database and settings)."""
        member = self.members[label]
        member.process = await self._spawn(
            member.service, member.database_url, member.env, member.ready_logs
        )
        member.generations += 1

    async def remove(self, label: str) -> None:
        """Stop a member for good (SIGTERM: a member leaving the group cleanly)."""
        member = self.members.pop(label)
        if member.stopped:
            member.process.process.send_signal(signal.SIGCONT)
        with contextlib.suppress(TimeoutError):
            await member.process.stop(within=30)

    def stop(self, label: str) -> None:
        """SIGSTOP: the process is frozen (no heartbeats, no progress) but keeps its state."""
        member = self.members[label]
        member.process.process.send_signal(signal.SIGSTOP)
        member.stopped = True

    def cont(self, label: str) -> None:
        member = self.members[label]
        if member.stopped:
            member.process.process.send_signal(signal.SIGCONT)
            member.stopped = False

    async def close(self) -> None:
        for member in self.members.values():
            if member.stopped:
                with contextlib.suppress(ProcessLookupError):
                    member.process.process.send_signal(signal.SIGCONT)
        await asyncio.gather(
            *(member.process.kill() for member in self.members.values()),
            return_exceptions=True,
        )
