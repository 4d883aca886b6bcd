"""Token buckets per (app, channel): the provider rate limits of one worker process.

A bucket holds up to one second of tokens and refills continuously; :meth:`TokenBucket.take`
waits until a token is there. The rate comes from the channel's ``rate_limit_per_second``, or
the provider's default (what the providers document as safe: Telegram 30/s per bot, WhatsApp
80/s, Twilio 100/s...); webhooks are unlimited unless configured.
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

    async def take(self) -> None:
        """Wait for a token and take it (callers are served in arrival order)."""
        if self.rate <= 0:
            return
        async with self._lock:
            self._refill()
            if self._tokens < 1:
                await asyncio.sleep((1 - self._tokens) / self.rate)
                self._refill()
            self._tokens -= 1


class RateLimits:
    """The buckets of one process, made on first use and re-made when a rate changes."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, Channel], TokenBucket] = {}

    @staticmethod
    def rate(channel: Channel, configured: float) -> float:
        """Calls per second on ``channel``: the configured rate, else the provider default
        (0: unlimited)."""
        return configured or DEFAULT_RATES.get(channel, 0.0)

    def bucket(self, app_id: str, channel: Channel, configured: float) -> TokenBucket:
        """The bucket of (app, channel) at the configured rate (0: the provider default)."""
        rate = self.rate(channel, configured)
        bucket = self._buckets.get((app_id, channel))
        if bucket is None or bucket.rate != rate:
            bucket = self._buckets[(app_id, channel)] = TokenBucket(rate)
        return bucket
