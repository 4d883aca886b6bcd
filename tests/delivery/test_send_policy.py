"""Send-time policy end to end: consent, erasure, TTL, quiet hours, frequency caps, send-at,
best channel, render failures. Each message ends with a status and a reason on its timeline."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf import duration_pb2, field_mask_pb2
from google.type import timeofday_pb2
from tidings.delivery.v1 import channel_pb2, message_pb2, template_pb2
from tidings.delivery.v1 import delivery_service_pb2 as dpb
from tidings.events.v1.delivery_receipt_pb2 import DeliveryReceipt
from tidings.identity.v1 import app_pb2, apps_service_pb2, user_ref_pb2
from tidings.identity.v1 import identity_service_pb2 as ipb
from tidings.identity.v1 import subscription_pb2 as spb

from tests.delivery.sink import Sink, SinkRequest
from tests.delivery.support import DeliveryHarness, ReceiptFeed, by_id, inline, struct, webhook
from tests.identity.conftest import ADMIN
from tests.identity.support import failure, item_failure
from tests.polling import eventually

S = message_pb2
WEBHOOK = channel_pb2.CHANNEL_WEBHOOK
TELEGRAM = channel_pb2.CHANNEL_TELEGRAM
DEFERRED = DeliveryReceipt.STATUS_DEFERRED


def _text(text: str) -> template_pb2.MessageContent:
    return template_pb2.MessageContent(text=template_pb2.TextContent(text=text))


def _chat() -> str:
    return str(10**9 + uuid.uuid4().int % 10**9)


def _chat_of(request: SinkRequest) -> str:
    body = request.json()
    assert isinstance(body, dict)
    return str(body["chat_id"])


def _reason(message: message_pb2.Message) -> str:
    return message.timeline[-1].reason


async def test_opted_out_subscription_is_never_messaged(
    harness: DeliveryHarness, sink: Sink
) -> None:
    await harness.telegram_channel(sink.url)
    user = await harness.user()
    await harness.subscribe(user.user_id, spb.SUBSCRIPTION_TYPE_TELEGRAM, _chat(), opted_in=False)
    [result] = (await harness.send([by_id(user.user_id)], inline(TELEGRAM, _text("hi")))).results
    message = await harness.wait_status(result.message_id, S.MESSAGE_STATUS_FAILED)
    assert _reason(message) == "NOT_OPTED_IN"
    assert sink.count == 0


async def test_an_unsubscribe_before_the_send_wins(harness: DeliveryHarness, sink: Sink) -> None:
    await harness.telegram_channel(sink.url)
    user = await harness.user()
    subscription = await harness.subscribe(user.user_id, spb.SUBSCRIPTION_TYPE_TELEGRAM, _chat())
    await harness.opt_out(subscription.subscription_id)
    [result] = (await harness.send([by_id(user.user_id)], inline(TELEGRAM, _text("hi")))).results
    assert _reason(await harness.wait_status(result.message_id, S.MESSAGE_STATUS_FAILED)) == (
        "NOT_OPTED_IN"
    )
    assert sink.count == 0


async def test_an_unsubscribe_while_a_rate_limited_send_waits_wins(
    harness: DeliveryHarness, sink: Sink
) -> None:
    """At 1 call/s the later messages of a batch wait seconds for their tokens; the profiles
    are read again before their claim, so an opt-out committed meanwhile wins."""
    await harness.delivery.UpdateChannelConfig(
        dpb.UpdateChannelConfigRequest(
            channel_config=channel_pb2.ChannelConfig(
                channel=TELEGRAM,
                credentials=struct({"bot_token": "123456:test-token", "endpoint": sink.url}),
                rate_limit_per_second=1,
            )
        ),
        metadata=harness.server,
    )
    users = [await harness.user() for _ in range(3)]
    chats = [_chat() for _ in users]
    subscriptions = [
        await harness.subscribe(user.user_id, spb.SUBSCRIPTION_TYPE_TELEGRAM, chat)
        for user, chat in zip(users, chats, strict=True)
    ]
    results = (
        await harness.send([by_id(u.user_id) for u in users], inline(TELEGRAM, _text("hi")))
    ).results
    [first] = await sink.wait_for(1)
    # The next call is a second away: opt out one of the two still waiting.
    out = next(i for i, chat in enumerate(chats) if chat != _chat_of(first))
    await harness.opt_out(subscriptions[out].subscription_id)
    failed = await harness.wait_status(results[out].message_id, S.MESSAGE_STATUS_FAILED)
    assert _reason(failed) == "NOT_OPTED_IN"
    for i, result in enumerate(results):
        if i != out:
            await harness.wait_status(result.message_id, S.MESSAGE_STATUS_SENT)
    assert sink.count == 2
    assert chats[out] not in {_chat_of(request) for request in sink.received}


async def test_a_subscribed_telegram_chat_gets_the_text(
    harness: DeliveryHarness, sink: Sink
) -> None:
    await harness.telegram_channel(sink.url)
    user = await harness.user(first_name="Ana")
    chat = _chat()
    subscription = await harness.subscribe(user.user_id, spb.SUBSCRIPTION_TYPE_TELEGRAM, chat)
    [result] = (
        await harness.send(
            [by_id(user.user_id)], inline(TELEGRAM, _text("Hi {{ user.first_name }}"))
        )
    ).results
    message = await harness.wait_status(result.message_id, S.MESSAGE_STATUS_SENT)
    assert message.subscription_id == subscription.subscription_id
    [request] = sink.received
    assert request.json() == {"chat_id": chat, "text": "Hi Ana"}


async def test_best_channel_falls_back_in_order(harness: DeliveryHarness, sink: Sink) -> None:
    await harness.webhook_channel()
    user = await harness.user()  # no telegram subscription: the webhook option is used
    spec = message_pb2.MessageSpec(
        options=[
            message_pb2.SendOption(channel=TELEGRAM, content=_text("hi")),
            message_pb2.SendOption(channel=WEBHOOK, content=webhook(f"{sink.url}/fallback")),
        ]
    )
    [result] = (await harness.send([by_id(user.user_id)], spec)).results
    message = await harness.wait_status(result.message_id, S.MESSAGE_STATUS_SENT)
    assert message.channel == WEBHOOK
    assert sink.received[0].path == "/fallback"


async def test_a_deleted_user_is_never_messaged(harness: DeliveryHarness, sink: Sink) -> None:
    await harness.webhook_channel()
    user = await harness.user()
    spec = inline(WEBHOOK, webhook(f"{sink.url}/x"))
    [before] = (await harness.send([by_id(user.user_id)], spec)).results
    await harness.wait_status(before.message_id, S.MESSAGE_STATUS_SENT)
    await harness.identity.DeleteUser(
        ipb.DeleteUserRequest(ref=by_id(user.user_id)), metadata=harness.server
    )

    # Delivery forgets the deleted user's messages when identity's fact arrives; the send
    # below waits for that, or the purge could take its message too.
    async def forgotten() -> bool:
        try:
            await harness.message(before.message_id)
        except grpc.aio.AioRpcError as error:
            return error.code() == grpc.StatusCode.NOT_FOUND
        return False

    await eventually(forgotten, within=30, what="delivery erasing the user's messages")
    [result] = (await harness.send([by_id(user.user_id)], spec)).results
    message = await harness.wait_status(result.message_id, S.MESSAGE_STATUS_FAILED)
    assert _reason(message) == "USER_NOT_FOUND"
    assert sink.count == 1


async def test_an_unknown_user_fails_with_a_reason(harness: DeliveryHarness, sink: Sink) -> None:
    await harness.webhook_channel()
    spec = inline(WEBHOOK, webhook(f"{sink.url}/x"))
    [result] = (await harness.send([by_id(str(uuid.uuid4()))], spec)).results
    assert _reason(await harness.wait_status(result.message_id, S.MESSAGE_STATUS_FAILED)) == (
        "USER_NOT_FOUND"
    )


async def test_a_missing_variable_fails_that_message_only(
    harness: DeliveryHarness, sink: Sink
) -> None:
    await harness.webhook_channel()
    named, nameless = await harness.user(first_name="Ana"), await harness.user()
    spec = inline(WEBHOOK, webhook(f"{sink.url}/x", body="{{ user.first_name }}"))
    ok, bad = (await harness.send([by_id(named.user_id), by_id(nameless.user_id)], spec)).results
    await harness.wait_status(ok.message_id, S.MESSAGE_STATUS_SENT)
    failed = await harness.wait_status(bad.message_id, S.MESSAGE_STATUS_FAILED)
    assert _reason(failed) == "RENDER_FAILED"
    assert "user.first_name" in failed.timeline[-1].detail
    assert [r.body for r in sink.received] == [b"Ana"]


async def test_an_expired_message_is_not_sent(harness: DeliveryHarness, sink: Sink) -> None:
    await harness.webhook_channel()
    user = await harness.user()
    spec = inline(WEBHOOK, webhook(f"{sink.url}/x"))
    spec.ttl.CopyFrom(duration_pb2.Duration(seconds=1))
    later = datetime.now(UTC) + timedelta(seconds=2)
    response = await harness.send([by_id(user.user_id)], spec, send_time=_stamp(later))
    [result] = response.results
    message = await harness.wait_status(result.message_id, S.MESSAGE_STATUS_FAILED, within=20)
    assert _reason(message) == "EXPIRED"
    assert sink.count == 0


def _stamp(moment: datetime) -> object:
    from google.protobuf import timestamp_pb2

    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


async def test_send_at_defers_then_sends(harness: DeliveryHarness, sink: Sink) -> None:
    await harness.webhook_channel()
    user = await harness.user()
    at = datetime.now(UTC) + timedelta(seconds=2)
    async with ReceiptFeed(harness.app.app_id) as feed:
        [result] = (
            await harness.send(
                [by_id(user.user_id)],
                inline(WEBHOOK, webhook(f"{sink.url}/x")),
                send_time=_stamp(at),
            )
        ).results
        waiting = await harness.message(result.message_id)
        assert waiting.status == S.MESSAGE_STATUS_DEFERRED
        assert waiting.timeline[-1].reason == "SEND_AT"
        # Like every other deferral, it is a fact on delivery.receipts.
        await feed.until(lambda _: bool(feed.of(result.message_id, DEFERRED)))
        [receipt] = feed.of(result.message_id, DEFERRED)
        assert (receipt.reason, receipt.user_id) == ("SEND_AT", user.user_id)
        await harness.wait_status(result.message_id, S.MESSAGE_STATUS_SENT, within=20)
        assert sink.received[0].time >= at.timestamp() - 0.05


async def _settings(
    harness: DeliveryHarness, settings: message_pb2.DeliverySettings, *paths: str
) -> None:
    await harness.delivery.UpdateDeliverySettings(
        dpb.UpdateDeliverySettingsRequest(
            settings=settings, update_mask=field_mask_pb2.FieldMask(paths=list(paths))
        ),
        metadata=harness.server,
    )


async def test_quiet_hours_defer_to_the_end_of_the_window_in_the_users_zone(
    harness: DeliveryHarness, sink: Sink
) -> None:
    await harness.webhook_channel()
    zone = "Asia/Tokyo"
    now_local = datetime.now(UTC).astimezone(__import__("zoneinfo").ZoneInfo(zone))
    start = now_local - timedelta(hours=1)
    end = now_local + timedelta(hours=2)
    quiet = message_pb2.QuietHours(
        enabled=True,
        start_time=timeofday_pb2.TimeOfDay(hours=start.hour, minutes=start.minute),
        end_time=timeofday_pb2.TimeOfDay(hours=end.hour, minutes=end.minute),
    )
    await _settings(harness, message_pb2.DeliverySettings(quiet_hours=quiet), "quiet_hours")
    user = await harness.user(timezone=zone)
    spec = inline(WEBHOOK, webhook(f"{sink.url}/x"))
    [result] = (await harness.send([by_id(user.user_id)], spec)).results
    message = await harness.wait_status(result.message_id, S.MESSAGE_STATUS_DEFERRED)
    assert _reason(message) == "QUIET_HOURS"
    due = message.next_attempt_time.ToDatetime(tzinfo=UTC)
    expected = end.replace(second=0, microsecond=0).astimezone(UTC)
    assert abs((due - expected).total_seconds()) < 61
    # Transactional messages may bypass quiet hours.
    spec.bypass_quiet_hours = True
    [urgent] = (await harness.send([by_id(user.user_id)], spec)).results
    await harness.wait_status(urgent.message_id, S.MESSAGE_STATUS_SENT)
    assert sink.count == 1


async def test_quiet_hours_of_a_user_without_a_zone_follow_the_apps_zone_in_identity(
    harness: DeliveryHarness, sink: Sink, apps_stub: Any
) -> None:
    await harness.webhook_channel()
    zone = "Asia/Tokyo"
    await apps_stub.UpdateApp(
        apps_service_pb2.UpdateAppRequest(
            app=app_pb2.App(
                app_id=harness.app.app_id, settings=app_pb2.AppSettings(default_timezone=zone)
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["settings.default_timezone"]),
        ),
        metadata=ADMIN,
    )
    # Quiet now in Tokyo, not in UTC (Tokyo is 9 hours ahead: the window can't hold both).
    now_local = datetime.now(UTC).astimezone(__import__("zoneinfo").ZoneInfo(zone))
    start, end = now_local - timedelta(hours=1), now_local + timedelta(hours=2)
    quiet = message_pb2.QuietHours(
        enabled=True,
        start_time=timeofday_pb2.TimeOfDay(hours=start.hour, minutes=start.minute),
        end_time=timeofday_pb2.TimeOfDay(hours=end.hour, minutes=end.minute),
    )
    await _settings(harness, message_pb2.DeliverySettings(quiet_hours=quiet), "quiet_hours")
    user = await harness.user()  # no time zone of its own
    [result] = (
        await harness.send([by_id(user.user_id)], inline(WEBHOOK, webhook(f"{sink.url}/x")))
    ).results
    message = await harness.wait_status(result.message_id, S.MESSAGE_STATUS_DEFERRED)
    assert _reason(message) == "QUIET_HOURS"
    due = message.next_attempt_time.ToDatetime(tzinfo=UTC)
    assert abs((due - end.replace(second=0, microsecond=0).astimezone(UTC)).total_seconds()) < 61
    assert sink.count == 0


async def test_frequency_cap_drops_over_the_cap_with_a_reason(
    harness: DeliveryHarness, sink: Sink
) -> None:
    await harness.webhook_channel()
    cap = message_pb2.FrequencyCap(
        max_messages=2,
        window=duration_pb2.Duration(seconds=3600),
        action=message_pb2.FrequencyCap.ACTION_DROP,
    )
    await _settings(harness, message_pb2.DeliverySettings(frequency_cap=cap), "frequency_cap")
    user = await harness.user()
    spec = inline(WEBHOOK, webhook(f"{sink.url}/x"))
    ids = []
    for _ in range(3):
        [result] = (await harness.send([by_id(user.user_id)], spec)).results
        ids.append(result.message_id)
        await harness.wait_status(result.message_id, S.MESSAGE_STATUS_SENT, S.MESSAGE_STATUS_FAILED)
    statuses = [(await harness.message(i)) for i in ids]
    assert [m.status for m in statuses] == [
        S.MESSAGE_STATUS_SENT,
        S.MESSAGE_STATUS_SENT,
        S.MESSAGE_STATUS_FAILED,
    ]
    assert _reason(statuses[2]) == "FREQUENCY_CAPPED"
    # A per-send override lifts it.
    spec.frequency_cap.CopyFrom(
        message_pb2.FrequencyCap(max_messages=5, window=duration_pb2.Duration(seconds=3600))
    )
    [more] = (await harness.send([by_id(user.user_id)], spec)).results
    await harness.wait_status(more.message_id, S.MESSAGE_STATUS_SENT)
    assert sink.count == 3


async def test_frequency_cap_can_defer_instead(harness: DeliveryHarness, sink: Sink) -> None:
    await harness.webhook_channel()
    user = await harness.user()
    spec = inline(WEBHOOK, webhook(f"{sink.url}/x"))
    spec.frequency_cap.CopyFrom(
        message_pb2.FrequencyCap(
            max_messages=1,
            window=duration_pb2.Duration(seconds=60),
            action=message_pb2.FrequencyCap.ACTION_DEFER,
        )
    )
    [first] = (await harness.send([by_id(user.user_id)], spec)).results
    await harness.wait_status(first.message_id, S.MESSAGE_STATUS_SENT)
    [second] = (await harness.send([by_id(user.user_id)], spec)).results
    deferred = await harness.wait_status(second.message_id, S.MESSAGE_STATUS_DEFERRED)
    assert _reason(deferred) == "FREQUENCY_CAPPED"
    sent_at = (await harness.message(first.message_id)).timeline[-1].time.ToDatetime(tzinfo=UTC)
    due = deferred.next_attempt_time.ToDatetime(tzinfo=UTC)
    assert abs((due - (sent_at + timedelta(seconds=60))).total_seconds()) < 2


async def test_send_validation_names_fields(harness: DeliveryHarness) -> None:
    failed = await failure(
        harness.delivery.Send(
            dpb.SendRequest(
                users=[by_id("not-a-uuid")],
                spec=message_pb2.MessageSpec(
                    options=[message_pb2.SendOption(template_id=str(uuid.uuid4()))]
                ),
                idempotency_key="has spaces",
            ),
            metadata=harness.server,
        )
    )
    # A bad key fails the call; a bad recipient only its own result.
    assert failed.fields == ["idempotency_key"]
    failed = await failure(
        harness.delivery.Send(
            dpb.SendRequest(
                users=[by_id(str(uuid.uuid4()))],
                spec=message_pb2.MessageSpec(
                    options=[message_pb2.SendOption(template_id=str(uuid.uuid4()))]
                ),
            ),
            metadata=harness.server,
        )
    )
    assert failed.fields == ["spec.options[0].template_id"]


async def test_a_dead_token_disables_the_subscription_in_identity(
    harness: DeliveryHarness,
) -> None:
    """Telegram answers 403 (the user blocked the bot): the FAILED receipt carries
    token_invalid, identity's receipts consumer disables the subscription, and the next send
    finds no enabled subscription."""
    blocked: tuple[int, dict[str, str], bytes] = (
        403,
        {},
        b'{"ok": false, "error_code": 403, '
        b'"description": "Forbidden: bot was blocked by the user"}',
    )
    async with Sink(script=lambda _: blocked) as telegram:
        await harness.telegram_channel(telegram.url)
        user = await harness.user()
        subscription = await harness.subscribe(
            user.user_id, spb.SUBSCRIPTION_TYPE_TELEGRAM, _chat()
        )
        [result] = (
            await harness.send([by_id(user.user_id)], inline(TELEGRAM, _text("hi")))
        ).results
        failed = await harness.wait_status(result.message_id, S.MESSAGE_STATUS_FAILED)
        assert _reason(failed) == "PROVIDER_REJECTED"
        deadline = datetime.now(UTC) + timedelta(seconds=30)
        while True:
            found = await harness.identity.GetSubscription(
                ipb.GetSubscriptionRequest(subscription_id=subscription.subscription_id),
                metadata=harness.server,
            )
            if not found.enabled:
                break
            assert datetime.now(UTC) < deadline, "identity never disabled the dead chat"
            await asyncio.sleep(0.2)
        assert found.disabled_reason.startswith("telegram")
        [again] = (await harness.send([by_id(user.user_id)], inline(TELEGRAM, _text("hi")))).results
        assert _reason(await harness.wait_status(again.message_id, S.MESSAGE_STATUS_FAILED)) == (
            "SUBSCRIPTION_DISABLED"
        )
        assert telegram.count == 1


async def test_a_malformed_recipient_is_refused_alone_and_replayed_as_such(
    harness: DeliveryHarness, sink: Sink
) -> None:
    await harness.webhook_channel()
    user = await harness.user()
    refs = [by_id("not-a-uuid"), by_id(user.user_id), user_ref_pb2.UserRef()]
    spec = inline(WEBHOOK, webhook(f"{sink.url}/x"))
    key = f"partial-{uuid.uuid4().hex}"
    response = await harness.send(refs, spec, key=key)
    bad, good, empty = response.results
    assert good.message_id
    assert not good.HasField("error")
    assert not bad.message_id
    assert not empty.message_id
    refused = item_failure(bad.error)
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.reason == "INVALID_RECIPIENT"
    assert refused.fields == ["users[0].user_id"]
    assert item_failure(empty.error).fields == ["users[2]"]
    await harness.wait_status(good.message_id, S.MESSAGE_STATUS_SENT)
    # The stored answer holds the refusals too; nothing is sent again.
    again = await harness.send(refs, spec, key=key)
    assert again.replayed
    assert list(again.results) == list(response.results)
    assert sink.count == 1


async def test_a_send_whose_every_recipient_is_refused_answers_each_refusal(
    harness: DeliveryHarness,
) -> None:
    response = await harness.send(
        [by_id("nope"), user_ref_pb2.UserRef(external_id=" ")],
        inline(WEBHOOK, webhook("http://127.0.0.1:9/x")),
    )
    assert [item_failure(r.error).fields for r in response.results] == [
        ["users[0].user_id"],
        ["users[1].external_id"],
    ]
    assert not any(r.message_id for r in response.results)
