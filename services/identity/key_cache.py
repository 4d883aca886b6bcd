"""In-process cache of valid app keys, invalidated at once in every replica by LISTEN/NOTIFY.

Looking a key up in Postgres on every call costs a pool checkout and a round trip per RPC, a
large share of a cheap call like GetUser. So successful lookups are cached (bounded, with a
TTL), and revocation stays immediate: RevokeApiKey sends ``NOTIFY tidings_api_keys, '<key_id>'``
in its transaction, and every identity process LISTENs on a dedicated connection
(:meth:`KeyCache.listen`, a background task) and drops the key when the notification arrives.
The revoking process also drops it itself before answering, so there the very next call is
refused without waiting for the notification.

Fail safe: the cache only serves while the LISTEN connection is up. If it is lost, a revocation
could go unseen, so the cache is cleared and stops caching until the connection is back (every
call then goes to Postgres, as before the cache existed).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable

import asyncpg

from services.identity.apps_store import API_KEYS_CHANNEL, ApiKeyRecord
from services.runtime.app import ServiceContext

__all__ = ["KeyCache"]

#: How long a cached key is trusted without asking Postgres again. Revocation does not wait for
#: it (notifications do that); it bounds how stale anything else about the key can get.
DEFAULT_TTL_SECONDS = 60.0
#: Most keys kept; the least recently used goes first. Keys per deployment are few, so this is
#: only a guard against memory growth.
DEFAULT_MAX_ENTRIES = 10_000
#: How often the LISTEN connection is probed, so a silently dead socket is noticed.
_PROBE_SECONDS = 5.0


class KeyCache:
    """Valid keys by secret hash, trusted only while revocations can be heard.

    Args:
        ttl_seconds: How long an entry is served.
        max_entries: Bound on the number of entries.
        clock: Monotonic seconds; injectable for tests.
    """

    def __init__(
        self,
        *,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, ApiKeyRecord]] = OrderedDict()
        # Off until the LISTEN connection is up: before that a revocation could go unseen.
        self._enabled = False
        # Bumped on every invalidation, so a lookup that started before one cannot store the
        # (possibly revoked) key it read afterwards.
        self._epoch = 0

    @property
    def enabled(self) -> bool:
        """Whether the cache serves and stores entries (the LISTEN connection is up)."""
        return self._enabled

    @property
    def epoch(self) -> int:
        """Take this before a lookup and hand it to :meth:`put`."""
        return self._epoch

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, secret_hash: bytes) -> ApiKeyRecord | None:
        """The cached valid key with this secret hash, or None (absent, expired or disabled)."""
        if not self._enabled:
            return None
        entry = self._entries.get(secret_hash)
        if entry is None:
            return None
        expires, record = entry
        if expires <= self._clock():
            del self._entries[secret_hash]
            return None
        self._entries.move_to_end(secret_hash)
        return record

    def put(self, secret_hash: bytes, record: ApiKeyRecord, epoch: int) -> None:
        """Cache a valid key read from Postgres when :attr:`epoch` was ``epoch``.

        Ignored when disabled, when the key is revoked, or when an invalidation happened since
        the lookup began (the record may predate a revocation).
        """
        if not self._enabled or epoch != self._epoch or record.revoke_time is not None:
            return
        self._entries[secret_hash] = (self._clock() + self._ttl, record)
        self._entries.move_to_end(secret_hash)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def forget(self, key_id: str) -> None:
        """Drop the key ``key_id`` (it was revoked)."""
        self._epoch += 1
        # Linear, but revocations are rare and the cache is small; a second index by key id
        # would have to be kept in step on every put and eviction.
        stale = [digest for digest, (_, record) in self._entries.items() if record.key_id == key_id]
        for digest in stale:
            del self._entries[digest]

    def enable(self) -> None:
        """Start caching (the LISTEN connection is up)."""
        self._enabled = True

    def disable(self) -> None:
        """Clear everything and stop caching (revocations can no longer be heard)."""
        self._enabled = False
        self._epoch += 1
        self._entries.clear()

    def _on_notification(self, connection: object, pid: int, channel: str, payload: object) -> None:
        self.forget(str(payload))

    async def listen(self, ctx: ServiceContext) -> None:
        """Hear revocations on a dedicated connection; caching is on only while it is up.

        Runs as a background task of the service. It never returns: a lost connection raises,
        and the runtime restarts the task with backoff (the cache stays off meanwhile).

        Raises:
            ConnectionError: The LISTEN connection was lost.
        """
        lost = asyncio.Event()
        conn: asyncpg.Connection = await asyncpg.connect(ctx.settings.database_url)
        try:
            conn.add_termination_listener(lambda _: lost.set())
            await conn.add_listener(API_KEYS_CHANNEL, self._on_notification)
            # Only now can every later revocation be heard; entries from before a previous
            # outage were cleared when it began.
            self.enable()
            while not lost.is_set():
                try:
                    await asyncio.wait_for(lost.wait(), _PROBE_SECONDS)
                except TimeoutError:
                    # A dead peer may not close the socket; a query that fails or hangs does.
                    await asyncio.wait_for(conn.fetchval("SELECT 1"), _PROBE_SECONDS)
            raise ConnectionError("the LISTEN connection for key revocations was lost")
        finally:
            self.disable()
            conn.terminate()
