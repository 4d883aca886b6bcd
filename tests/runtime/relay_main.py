"""Runs one OutboxRelay as a real process, for tests that SIGKILL it.

    python -m tests.runtime.relay_main DSN BOOTSTRAP SERVICE [--batch-size N]
                                       [--crash-after-commits N]

Runs until SIGTERM. With ``--crash-after-commits N`` it SIGKILLs itself right after its N-th
Kafka commit, before deleting that batch from the outbox: the worst moment to die.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Sequence

from services.runtime.db import create_pool
from services.runtime.outbox import OutboxRelay


class CrashingRelay(OutboxRelay):
    """A relay that kills its own process after a number of Kafka commits."""

    def __init__(self, *args: object, crash_after: int, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self._commits_left = crash_after

    def _after_kafka_commit(self, ids: Sequence[int]) -> None:
        self._commits_left -= 1
        if self._commits_left == 0:
            os.kill(os.getpid(), signal.SIGKILL)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("bootstrap")
    parser.add_argument("service")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--crash-after-commits", type=int, default=0)
    args = parser.parse_args()

    pool = await create_pool(args.dsn, min_size=1, max_size=3)
    relay: OutboxRelay
    if args.crash_after_commits:
        relay = CrashingRelay(
            pool,
            args.bootstrap,
            service=args.service,
            batch_size=args.batch_size,
            standby_retry=0.05,
            crash_after=args.crash_after_commits,
        )
    else:
        relay = OutboxRelay(
            pool,
            args.bootstrap,
            service=args.service,
            batch_size=args.batch_size,
            standby_retry=0.05,
        )
    stopping: set[asyncio.Task[None]] = set()
    asyncio.get_running_loop().add_signal_handler(
        signal.SIGTERM, lambda: stopping.add(asyncio.create_task(relay.stop()))
    )
    try:
        await relay.run()
    finally:
        await pool.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="relay %(process)d %(levelname)s %(message)s")
    asyncio.run(main())
