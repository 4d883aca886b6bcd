"""A call whose answer is lost after the request went out, on a channel whose provider would
deliver a repeat (SMS through Twilio): FAILED OUTCOME_UNKNOWN, never called again — at most
once. (Webhooks repeat such a call with the same key: tests/delivery/test_workers.py.)"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
from tidings.delivery.v1 import channel_pb2, message_pb2
from tidings.identity.v1 import subscription_pb2 as spb

from tests.delivery.providers.fakes.server import Reply, Request
from tests.delivery.providers.fakes.twilio import FakeTwilio
from tests.delivery.support import DeliveryHarness, by_id, inline
from tests.delivery.test_delivery_reports import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    _configure_twilio,
    _phone,
    _recipients,
    _text,
)

S = message_pb2


class _SilentTwilio(FakeTwilio):
    """Takes every message and never answers (the answer is lost on the way back)."""

    def __init__(self) -> None:
        super().__init__(ACCOUNT_SID, AUTH_TOKEN)
        self.calls = 0
        self.release = asyncio.Event()

    async def answer(self, request: Request) -> Reply:
        self.calls += 1
        await self.release.wait()  # long after the caller gave up
        return await super().answer(request)


async def test_an_sms_whose_answer_is_lost_is_never_sent_again(harness: DeliveryHarness) -> None:
    async with _SilentTwilio() as twilio:
        await _configure_twilio(harness, twilio.url)
        [(user_id, _)] = await _recipients(harness, spb.SUBSCRIPTION_TYPE_SMS, [_phone()])
        spec = inline(channel_pb2.CHANNEL_SMS, _text("Your code is 1234"))
        [result] = (await harness.send([by_id(user_id)], spec)).results
        # The adapter's read timeout (10 s) ends the call; the provider may have the message.
        try:
            message = await harness.wait_status(
                result.message_id, S.MESSAGE_STATUS_FAILED, within=40
            )
            # Nothing is left to send it again: the ledger row is final, with no retry due.
            conn = await asyncpg.connect(harness.database_url)
            try:
                row = await conn.fetchrow(
                    "SELECT state, due_at FROM messages WHERE app_id = $1 AND message_id = $2",
                    harness.app.app_id,
                    uuid.UUID(result.message_id),
                )
            finally:
                await conn.close()
            assert row is not None
            assert (row["state"], row["due_at"]) == ("failed", None)
        finally:
            twilio.release.set()
    assert twilio.calls == 1
    assert message.attempts == 1
    assert [(c.status, c.reason) for c in message.timeline][-1] == (
        S.MESSAGE_STATUS_FAILED,
        "OUTCOME_UNKNOWN",
    )
