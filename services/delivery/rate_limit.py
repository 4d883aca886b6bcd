"""Token buckets per (app, channel): the provider rate limits, shared out between workers.

A bucket holds up to one second of tokens and refills continuously; :meth:`TokenBucket.take`
waits until a token is there. The rate comes from the channel's ``rate_limit_per_second``, or
the provider's default (what the providers document as safe: Telegram 30/s per bot, WhatsApp
80/s, Twilio 100/s...); webhooks are unlimited unless configured.

The rate is the whole deployment's, not one process's: each worker takes the share of it
that matches its share of the ``delivery.requests`` partitions (:meth:`RateLimits.set_share`,
called on every consumer-group rebalance), so N workers together stay at the configured rate
without talking to each other per message. Records are keyed by user id, so the partitions
carry about equal work and the shares about match the load.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from services.delivery.providers.base import Channel

__all__ = ["DEFAULT_RATES", "RateLimits", "TokenBucket"]

#: Calls per second when the channel sets none; 0 means unlimited.
DEFAULT_RATES: dict[Channel, float] = {
    Channel.IOS_PUSH: 4_000.0,
    Channel.ANDROID_PUSH: 4_000.0,
    Channel.WEB_PUSH: 1_000.0,
    Channel.EMAIL: 100.0,
    Channel.SMS: 100.0,
    Channel.WHATSAPP: 80.0,
    Channel.TELEGRAM: 30.0,
    Channel.WEBHOOK: 0.0,
}


class TokenBucket:
    """``rate`` tokens per second, bursting up to ``max(1, rate)``."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._capacity = max(1.0, rate)
        self._tokens = self._capacity
        self._clock = clock
        self._stamp = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def set_rate(self, rate: float) -> None:
        """Change the rate, keeping the tokens already there (up to the new capacity): a
        changed share must not hand out a fresh second of burst."""
        self._refill()
        self.rate = rate
        self._capacity = max(1.0, rate)
        self._tokens = min(self._tokens, self._capacity)

    async def take(self) -> float:
        """Wait for a token and take it (callers are served in arrival order); returns the
        seconds it waited (0.0: a token was there)."""
        if self.rate <= 0:
            return 0.0
        started = self._clock()
        async with self._lock:
            self._refill()
            if self._tokens < 1:
                await asyncio.sleep((1 - self._tokens) / self.rate)
                self._refill()
            self._tokens -= 1
        return self._clock() - started


class RateLimits:
    """The buckets of one worker, made on first use and re-rated when a rate or the worker's
    share changes."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, Channel], TokenBucket] = {}
        self._configured: dict[tuple[str, Channel], float] = {}
        self._share = 1.0

    @property
    def share(self) -> float:
        """The fraction of each configured rate this worker may use (1.0 alone)."""
        return self._share

    def set_share(self, owned: int, total: int) -> None:
        """Take ``owned / total`` of every rate: this worker's partitions of the topic.

        Buckets already made are re-rated at once: a batch that holds one while the group
        rebalances must not go on at the old share beside the worker that took the other
        partitions. A worker between a revocation and its next assignment keeps one
        partition's share, so a batch it is finishing still sends (slowly) rather than stalls.
        """
        if total <= 0:
            return
        self._share = min(1.0, max(1, owned) / total)
        for key, bucket in self._buckets.items():
            bucket.set_rate(self.rate(key[1], self._configured[key]))

    def rate(self, channel: Channel, configured: float) -> float:
        """This worker's calls per second on ``channel``: its share of the configured rate,
        else of the provider default (0: unlimited)."""
        return (configured or DEFAULT_RATES.get(channel, 0.0)) * self._share

    def bucket(self, app_id: str, channel: Channel, configured: float) -> TokenBucket:
        """The bucket of (app, channel) at this worker's rate (``configured`` 0: the provider
        default)."""
        key = (app_id, channel)
        rate = self.rate(channel, configured)
        self._configured[key] = configured
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(rate)
        elif bucket.rate != rate:
            bucket.set_rate(rate)
        return bucket
