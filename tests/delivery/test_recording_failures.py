"""A worker whose recording of provider answers fails (a real PostgreSQL error, raised by a
trigger on the ledger row) tries again, so the answer is not lost; and when recording keeps
failing it gives the claimed rows up to the scheduler instead of holding them ``sending``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
from tidings.delivery.v1 import channel_pb2, message_pb2
from tidings.events.v1.delivery_receipt_pb2 import DeliveryReceipt

from services.delivery.leases import LIVE_LEASE
from tests.delivery.sink import Sink
from tests.delivery.support import DeliveryHarness, ReceiptFeed, by_id, inline, webhook
from tests.polling import eventually

S = message_pb2
WEBHOOK = channel_pb2.CHANNEL_WEBHOOK


@dataclass
class Induced:
    """The trigger's connection (for checks) and its counter."""

    conn: asyncpg.Connection
    sequence: str

    async def fired(self) -> int:
        """How many times the trigger ran."""
        return int(await self.conn.fetchval(f"SELECT last_value FROM {self.sequence}"))


@asynccontextmanager
async def failing_recordings(
    database_url: str, user_id: str, failures: int
) -> AsyncIterator[Induced]:
    """Make the first ``failures`` updates that move ``user_id``'s messages out of
    ``sending`` raise. The count is a sequence: ``nextval`` survives the rollback."""
    name = f"fail_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f"CREATE SEQUENCE {name}")
        await conn.execute(
            f"""
            CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF nextval('{name}') <= {failures} THEN
                    RAISE EXCEPTION 'induced failure of the recording';
                END IF;
                RETURN NEW;
            END $$
            """
        )
        await conn.execute(
            f"""
            CREATE TRIGGER {name} BEFORE UPDATE ON messages FOR EACH ROW
            WHEN (OLD.state = 'sending' AND NEW.state <> 'sending'
                  AND NEW.user_id = '{user_id}')
            EXECUTE FUNCTION {name}()
            """
        )
        yield Induced(conn, name)
    finally:
        await conn.execute(f"DROP TRIGGER IF EXISTS {name} ON messages")
        await conn.execute(f"DROP FUNCTION IF EXISTS {name}()")
        await conn.execute(f"DROP SEQUENCE IF EXISTS {name}")
        await conn.close()


async def test_a_recording_that_fails_once_is_retried_and_the_message_sent_once(
    harness: DeliveryHarness, sink: Sink
) -> None:
    await harness.webhook_channel()
    user = await harness.user()
    async with (
        failing_recordings(harness.database_url, user.user_id, failures=1) as induced,
        ReceiptFeed(harness.app.app_id) as feed,
    ):
        response = await harness.send(
            [by_id(user.user_id)], inline(WEBHOOK, webhook(f"{sink.url}/hook"))
        )
        [result] = response.results
        await harness.wait_status(result.message_id, S.MESSAGE_STATUS_SENT)
        await feed.until(lambda _: bool(feed.of(result.message_id, DeliveryReceipt.STATUS_SENT)))
        # The trigger ran twice: the failed recording, then the one that committed.
        assert await induced.fired() == 2

    assert len(sink.received) == 1
    assert len(feed.of(result.message_id, DeliveryReceipt.STATUS_SENT)) == 1
    assert [r.status for r in feed.of(result.message_id)] == [DeliveryReceipt.STATUS_SENT]


async def test_a_recording_that_keeps_failing_gives_the_row_up_to_the_scheduler(
    harness: DeliveryHarness, sink: Sink
) -> None:
    await harness.webhook_channel()
    user = await harness.user()
    async with failing_recordings(harness.database_url, user.user_id, failures=1000) as induced:
        response = await harness.send(
            [by_id(user.user_id)], inline(WEBHOOK, webhook(f"{sink.url}/hook"))
        )
        [result] = response.results
        await sink.wait_for(1)

        # Still "sending" (the answer could not be recorded), but no longer under a live
        # lease: the scheduler's stuck-send rule now applies to it.
        async def released() -> bool:
            row = await induced.conn.fetchrow(
                f"""
                SELECT state, {LIVE_LEASE.format(claimed_by="claimed_by")} AS leased
                FROM messages WHERE message_id = $1
                """,
                uuid.UUID(result.message_id),
            )
            assert row is not None
            assert row["state"] == "sending"
            return not row["leased"]

        await eventually(
            released, within=30, interval=0.2, what="the lease of the stuck row released"
        )
        # The worker claims again under a new lease: the next message is sent and recorded.
        other = await harness.user()
        again = await harness.send(
            [by_id(other.user_id)], inline(WEBHOOK, webhook(f"{sink.url}/hook"))
        )
        await harness.wait_status(again.results[0].message_id, S.MESSAGE_STATUS_SENT)
