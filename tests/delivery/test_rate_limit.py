"""Rate limits (pure, with a fake clock): token buckets and a worker's share of a rate."""

from __future__ import annotations

import asyncio

from services.delivery.providers.base import Channel
from services.delivery.rate_limit import RateLimits, TokenBucket


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def _took_at_once(bucket: TokenBucket) -> bool:
    """Whether a token was there (take() returned without waiting for a refill)."""
    try:
        await asyncio.wait_for(bucket.take(), 0.05)
    except TimeoutError:
        return False
    return True


async def test_a_bucket_bursts_one_second_then_refills_at_its_rate() -> None:
    clock = _Clock()
    bucket = TokenBucket(4, clock)
    assert await bucket.take() == 0.0  # no wait
    for _ in range(3):
        assert await _took_at_once(bucket)
    assert not await _took_at_once(bucket)
    clock.now += 0.5  # two more tokens
    assert await _took_at_once(bucket)


async def test_a_new_rate_keeps_the_tokens_it_has() -> None:
    clock = _Clock()
    bucket = TokenBucket(10, clock)
    for _ in range(10):
        await bucket.take()
    bucket.set_rate(5)  # no fresh second of burst
    assert not await _took_at_once(bucket)
    clock.now += 0.2
    assert await _took_at_once(bucket)


def test_a_worker_takes_its_partitions_share_of_each_rate() -> None:
    limits = RateLimits()
    assert limits.rate(Channel.TELEGRAM, 0) == 30  # the provider default, alone
    assert limits.rate(Channel.WEBHOOK, 0) == 0  # unlimited
    limits.set_share(6, 12)
    assert limits.rate(Channel.TELEGRAM, 0) == 15
    assert limits.rate(Channel.WEBHOOK, 50) == 25
    assert limits.rate(Channel.WEBHOOK, 0) == 0  # unlimited stays unlimited
    bucket = limits.bucket("app", Channel.TELEGRAM, 0)
    assert bucket.rate == 15
    limits.set_share(12, 12)
    assert limits.bucket("app", Channel.TELEGRAM, 0) is bucket
    assert bucket.rate == 30
    # Between a revocation and the next assignment: one partition's share, never unlimited.
    limits.set_share(0, 12)
    assert limits.rate(Channel.TELEGRAM, 0) == 2.5


def test_a_bucket_in_use_takes_the_new_share_at_once() -> None:
    # A batch holds its bucket for as long as it sends; when the group rebalances meanwhile,
    # this worker and the one that took half the partitions must stay at the channel's rate.
    limits = RateLimits()
    limits.set_share(12, 12)
    in_use = limits.bucket("app", Channel.TELEGRAM, 30.0)
    limits.set_share(0, 12)  # revoked: one partition's share until the next assignment
    assert in_use.rate == 2.5
    limits.set_share(6, 12)
    other = RateLimits()
    other.set_share(6, 12)
    assert in_use.rate + other.bucket("app", Channel.TELEGRAM, 30.0).rate == 30.0
