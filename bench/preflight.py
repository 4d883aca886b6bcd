"""A quick look at the stack before a run: a stopped stack gives one clear line, not tracebacks."""

from __future__ import annotations

import asyncio

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient

from bench.config import Stack

TIMEOUT_S = 10.0


async def _check_postgres(stack: Stack) -> str | None:
    try:
        conn = await asyncpg.connect(stack.pg_admin_dsn, timeout=TIMEOUT_S)
    except (OSError, asyncpg.PostgresError, TimeoutError) as error:
        return f"PostgreSQL unreachable ({error.__class__.__name__}: {error})"
    await conn.close()
    return None


async def _check_kafka(stack: Stack) -> str | None:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=stack.kafka_bootstrap, request_timeout_ms=int(TIMEOUT_S * 1000)
    )
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await admin.start()
    except Exception as error:  # aiokafka raises its own KafkaError types, and OSError
        return f"Kafka unreachable at {stack.kafka_bootstrap} ({error.__class__.__name__})"
    finally:
        await admin.close()
    return None


async def check_stack(stack: Stack) -> list[str]:
    """Connects once to PostgreSQL and Kafka.

    Args:
        stack: The stack the run will use.

    Returns:
        One message per unreachable part; empty when both answer.
    """
    results = await asyncio.gather(_check_postgres(stack), _check_kafka(stack))
    return [problem for problem in results if problem]
