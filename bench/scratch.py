"""Throw-away databases and topics, so a benchmark never touches development data."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.config import Stack

#: Every scratch resource carries this prefix, so leftovers of a killed run are easy to spot.
SCRATCH_PREFIX = "bench"


def scratch_name(separator: str = "_") -> str:
    """A name no other run uses, e.g. ``bench_1f2e3d4c5b6a``.

    Args:
        separator: Between the prefix and the random part (topics read better with ``.``).

    Returns:
        The name.
    """
    return f"{SCRATCH_PREFIX}{separator}{uuid.uuid4().hex[:12]}"


@asynccontextmanager
async def scratch_database(stack: Stack) -> AsyncIterator[str]:
    """Creates an empty database and drops it (forcibly) on exit.

    Args:
        stack: The server to create it on.

    Yields:
        The new database's DSN.
    """
    name = scratch_name()
    admin = await asyncpg.connect(stack.pg_admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield stack.dsn_for(name)
    finally:
        admin = await asyncpg.connect(stack.pg_admin_dsn)
        try:
            # FORCE: a benchmark that failed half-way may have left a connection open.
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@asynccontextmanager
async def scratch_topic(stack: Stack, partitions: int = 12) -> AsyncIterator[str]:
    """Creates a topic (the broker does not auto-create them) and deletes it on exit.

    Args:
        stack: The broker to create it on.
        partitions: Partition count; 12 like the project's own topics.

    Yields:
        The topic's name.
    """
    name = scratch_name(".")
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        try:
            yield name
        finally:
            await admin.delete_topics([name])
    finally:
        await admin.close()
