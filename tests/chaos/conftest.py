"""Fixtures of the fault suite: size and seed, the private stack, a cluster per test, a table.

* ``TIDINGS_CHAOS_SIZE``: ``ci`` (default; what ``make test`` runs) or ``full`` (``make chaos``).
* ``TIDINGS_CHAOS_SEED``: the run's seed. Unset, CI uses a fixed seed (CI stays deterministic)
  and ``full`` draws one. The seed is printed in pytest's header, in every failure and in the
  summary table; each scenario derives its own random source from it and its name.

Everything runs on a private PostgreSQL and Kafka (:mod:`tests.chaos.stack`): the suite
restarts them, which it must never do to the shared stack.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from tidings.identity.v1 import apps_service_pb2_grpc

from tests.chaos.checker import Verdict
from tests.chaos.cluster import Cluster, Member
from tests.chaos.stack import PrivateStack, private_stack
from tests.identity.conftest import TestApp, create_test_app


@dataclass(frozen=True)
class Size:
    """How big each scenario runs."""

    name: str
    #: Scenario 1: messages in the broadcast and worker kills.
    broadcast: int
    broadcast_kills: int
    #: Scenario 2: customers through the journey, engine kills, the wait's delay (seconds).
    customers: int
    engine_kills: int
    wait_seconds: float
    #: Scenario 3: identity writes of each kind per client, identity kills.
    writes: int
    identity_kills: int
    #: Scenario 4: records under rebalancing, membership changes.
    rebalance_messages: int
    churn: int
    #: Scenario 9: messages per throughput run.
    throughput_messages: int
    #: pytest-timeout of each scenario (seconds).
    timeout: float


SIZES = {
    "ci": Size(
        name="ci",
        broadcast=20_000,
        broadcast_kills=3,
        customers=150,
        engine_kills=3,
        wait_seconds=12.0,
        writes=50,
        identity_kills=2,
        rebalance_messages=1_500,
        churn=4,
        throughput_messages=1_200,
        timeout=600,
    ),
    # For working on the suite itself: every scenario in seconds.
    "tiny": Size(
        name="tiny",
        broadcast=600,
        broadcast_kills=2,
        customers=40,
        engine_kills=2,
        wait_seconds=6.0,
        writes=30,
        identity_kills=1,
        rebalance_messages=500,
        churn=2,
        throughput_messages=600,
        timeout=400,
    ),
    "full": Size(
        name="full",
        broadcast=100_000,
        broadcast_kills=5,
        customers=3_000,
        engine_kills=6,
        wait_seconds=30.0,
        writes=1_500,
        identity_kills=4,
        rebalance_messages=30_000,
        churn=10,
        throughput_messages=6_000,
        timeout=3_600,
    ),
}
#: The seed CI uses when none is given.
CI_SEED = 20_261_124

SIZE = SIZES[os.environ.get("TIDINGS_CHAOS_SIZE", "ci")]
_GIVEN_SEED = os.environ.get("TIDINGS_CHAOS_SEED", "").strip()
SEED = (
    int(_GIVEN_SEED)
    if _GIVEN_SEED
    else (CI_SEED if SIZE.name == "ci" else random.randrange(1 << 31))
)

#: The verdicts of this session, printed as a table at its end.
VERDICTS: list[Verdict] = []


def pytest_report_header() -> str:
    return f"chaos: size={SIZE.name} seed={SEED} (reproduce: make chaos SEED={SEED})"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not VERDICTS:
        return
    write = terminalreporter.write_line
    write("")
    write(f"chaos results (size {SIZE.name}, seed {SEED})")
    header = f"{'scenario':<34} {'seed':>11} {'operations':>10} {'lost':>6} {'dup':>6} verdict"
    write(header)
    write("-" * len(header))
    for verdict in VERDICTS:
        row = verdict.row()
        write(
            f"{row['scenario']!s:<34} {row['seed']!s:>11} {row['operations']!s:>10} "
            f"{row['lost']!s:>6} {row['duplicated']!s:>6} {row['verdict']}"
            + (
                ""
                if verdict.passed
                else f"  ({len(verdict.unexpected)} unexpected, {len(verdict.other)} other)"
            )
        )
    report = os.environ.get("TIDINGS_CHAOS_REPORT")
    if report:
        with Path(report).open("a", encoding="utf-8") as out:
            for verdict in VERDICTS:
                out.write(json.dumps({"size": SIZE.name, **verdict.row()}, default=str) + "\n")


def scenario_rng(name: str) -> random.Random:
    """The scenario's own random source: same seed, same draws, whatever else ran."""
    return random.Random(f"{SEED}:{name}")


def new_verdict(scenario: str, operations: int) -> Verdict:
    """A verdict that will be printed in the summary table."""
    verdict = Verdict(scenario=scenario, seed=SEED, operations=operations)
    VERDICTS.append(verdict)
    return verdict


@pytest.fixture(scope="session")
async def stack() -> AsyncIterator[PrivateStack]:
    """The private PostgreSQL and Kafka of the session."""
    print(f"\n{pytest_report_header()}", flush=True)  # also under -q, which hides the header
    async with private_stack() as started:
        yield started


@pytest.fixture
async def cluster(stack: PrivateStack, tmp_path: Path) -> AsyncIterator[Cluster]:
    """Service processes of one test (killed at its end)."""
    processes = Cluster(stack, tmp_path)
    try:
        yield processes
    finally:
        await processes.close()


@pytest.fixture
async def identity(cluster: Cluster, stack: PrivateStack) -> Member:
    """An identity process on its own database of the private cluster."""
    return await cluster.start("identity", "identity", await stack.postgres.create_database())


@pytest.fixture
async def app(identity: Member) -> TestApp:
    """A new app with a server key."""
    async with grpc.aio.insecure_channel(identity.target) as channel:
        return await create_test_app(apps_service_pb2_grpc.AppsServiceStub(channel))
