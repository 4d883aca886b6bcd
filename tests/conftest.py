"""Fixtures for the whole suite: the real local stack (Postgres + Kafka) and scratch resources.

The stack is the one ``scripts/stack.sh up`` starts (``make test`` starts it); point the suite at
another one with ``TIDINGS_TEST_PG_ADMIN_DSN`` / ``TIDINGS_TEST_KAFKA_BOOTSTRAP``. Each test that
needs a database gets a fresh one, and each topic name is unique, so tests never depend on order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

# A failed test shows what the service processes logged as errors while it ran.
from tests.service_logs import pytest_runtest_makereport, pytest_runtest_setup  # noqa: F401

PG_ADMIN_DSN = os.environ.get(
    "TIDINGS_TEST_PG_ADMIN_DSN", "postgresql://tidings:tidings@127.0.0.1:55432/postgres"
)
KAFKA_BOOTSTRAP = os.environ.get("TIDINGS_TEST_KAFKA_BOOTSTRAP", "127.0.0.1:19092")


def dsn_for(database: str) -> str:
    """The admin DSN pointed at another database on the same server."""
    base, _, _ = PG_ADMIN_DSN.rpartition("/")
    return f"{base}/{database}"


def unique_name(prefix: str) -> str:
    """A name no other test (or earlier run) uses."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture(autouse=True)
async def _fail_on_unhandled_loop_errors() -> AsyncIterator[None]:
    """Like asyncpg's test base: an error the loop had nobody to hand to fails the test."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        yield
    finally:
        loop.set_exception_handler(previous)
    assert not errors, f"unhandled event-loop errors: {errors}"


@pytest.fixture(scope="session")
def pg_admin_dsn() -> str:
    return PG_ADMIN_DSN


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    return KAFKA_BOOTSTRAP


@contextlib.asynccontextmanager
async def temporary_database() -> AsyncIterator[str]:
    """A brand-new empty database; yields its DSN and drops it afterwards.

    A service that ran on it left an outbox progress topic named after the database's
    instance id; it is deleted too, so test runs don't pile topics up on the broker.
    """
    name = unique_name("t")
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield dsn_for(name)
    finally:
        instance = await _outbox_instance(dsn_for(name))
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
        if instance is not None:
            await delete_topics(lambda topic: topic.endswith(f".{instance}"))


async def _outbox_instance(dsn: str) -> str | None:
    """The database's outbox instance id, if the runtime migration ran on it."""
    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SELECT id FROM outbox_instance"))
    except asyncpg.UndefinedTableError:
        return None
    finally:
        await conn.close()


@pytest.fixture
async def scratch_db() -> AsyncIterator[str]:
    """A fresh empty database for one test (its DSN)."""
    async with temporary_database() as dsn:
        yield dsn


#: Topics this test session created; deleted when the session ends.
_created_topics: set[str] = set()


async def create_topic(name: str, partitions: int = 3) -> None:
    """Create a topic on the test broker (the broker does not auto-create topics).

    It is deleted at the end of the test session.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA_BOOTSTRAP)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()
    _created_topics.add(name)


async def delete_topics(which: Callable[[str], bool]) -> None:
    """Delete the broker's topics whose names ``which`` accepts."""
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA_BOOTSTRAP)
    await admin.start()
    try:
        doomed = [topic for topic in await admin.list_topics() if which(topic)]
        if doomed:
            await admin.delete_topics(doomed)
    finally:
        await admin.close()


@pytest.fixture(scope="session", autouse=True)
async def _delete_created_topics() -> AsyncIterator[None]:
    yield
    await delete_topics(lambda topic: topic in _created_topics)


@pytest.fixture
async def scratch_topic() -> str:
    """A new topic with 3 partitions and a unique name."""
    name = unique_name("t").replace("_", ".")
    await create_topic(name)
    return name
