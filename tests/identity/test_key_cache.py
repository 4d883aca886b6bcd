"""The key cache: TTL and bound, and invalidation by NOTIFY from any process (fail safe).

The cross-replica path is tested without a second service: a NOTIFY sent on another connection
is exactly what another replica's RevokeApiKey sends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import asyncpg
import pytest

from services.identity.apps_store import API_KEYS_CHANNEL, ApiKeyRecord
from services.identity.key_cache import KeyCache
from services.identity.settings import IdentitySettings
from services.runtime.app import ServiceContext
from services.runtime.auth import Scope
from services.runtime.metrics import Metrics
from tests.conftest import temporary_database


def _record(key_id: str, *, revoked: bool = False) -> ApiKeyRecord:
    now = datetime.now(UTC)
    return ApiKeyRecord(
        key_id=key_id,
        app_id="app",
        scope=Scope.SERVER,
        display_name="",
        prefix="tk_server_x",
        create_time=now,
        revoke_time=now if revoked else None,
    )


async def _until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``condition`` (the cache has no event to wait on) until it holds or time runs out."""
    for _ in range(int(within / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


def test_serves_nothing_until_enabled_and_respects_ttl_and_bound() -> None:
    now = [0.0]
    cache = KeyCache(ttl_seconds=10, max_entries=2, clock=lambda: now[0])
    cache.put(b"a", _record("ka"), cache.epoch)
    assert cache.get(b"a") is None  # disabled: nothing stored or served
    cache.enable()
    cache.put(b"a", _record("ka"), cache.epoch)
    cache.put(b"r", _record("kr", revoked=True), cache.epoch)
    assert cache.get(b"a") is not None
    assert cache.get(b"r") is None  # revoked keys are never cached
    cache.put(b"b", _record("kb"), cache.epoch)
    cache.put(b"c", _record("kc"), cache.epoch)
    assert len(cache) == 2
    assert cache.get(b"a") is None
    now[0] = 11
    assert cache.get(b"b") is None  # expired


def test_a_lookup_overtaken_by_a_revocation_is_not_cached() -> None:
    cache = KeyCache()
    cache.enable()
    epoch = cache.epoch
    cache.forget("ka")  # revoked while the lookup was reading the (then valid) row
    cache.put(b"a", _record("ka"), epoch)
    assert cache.get(b"a") is None


@pytest.fixture
async def database() -> AsyncIterator[str]:
    async with temporary_database() as dsn:
        yield dsn


async def test_notify_from_another_connection_drops_the_key(database: str) -> None:
    cache = KeyCache()
    ctx = ServiceContext(
        settings=IdentitySettings(database_url=database),
        log=logging.getLogger("test"),
        metrics=Metrics(),
    )
    listener = asyncio.create_task(cache.listen(ctx))
    try:
        await _until(lambda: cache.enabled)
        cache.put(b"a", _record("ka"), cache.epoch)
        cache.put(b"b", _record("kb"), cache.epoch)
        other = await asyncpg.connect(database)
        try:
            await other.execute("SELECT pg_notify($1, $2)", API_KEYS_CHANNEL, "ka")
            await _until(lambda: len(cache) == 1)
            assert cache.get(b"a") is None
            assert cache.get(b"b") is not None

            # Losing the LISTEN connection clears the cache and stops caching.
            await other.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await other.close()
        with pytest.raises((ConnectionError, asyncpg.PostgresError, asyncpg.InterfaceError)):
            async with asyncio.timeout(10):
                await listener
        assert not cache.enabled
        assert len(cache) == 0
        cache.put(b"b", _record("kb"), cache.epoch)
        assert cache.get(b"b") is None
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
