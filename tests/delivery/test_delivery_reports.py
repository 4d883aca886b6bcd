"""Providers' delivery reports over real HTTP to the tracking endpoint: Twilio status callbacks,
WhatsApp Cloud API status webhooks and email bounces/complaints (RFC 3464 / RFC 5965). Each
moves the message to DELIVERED, BOUNCED, FAILED or OPENED with a receipt; a dead address makes
identity disable the subscription; forged reports are refused."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
from tidings.delivery.v1 import channel_pb2, message_pb2, template_pb2
from tidings.delivery.v1 import delivery_service_pb2 as dpb
from tidings.events.v1.delivery_receipt_pb2 import DeliveryReceipt
from tidings.identity.v1 import identity_service_pb2 as ipb
from tidings.identity.v1 import subscription_pb2 as spb

from tests.delivery.providers.fakes.smtp import FakeSmtpServer
from tests.delivery.providers.fakes.twilio import FakeTwilio
from tests.delivery.providers.fakes.whatsapp import FakeWhatsApp
from tests.delivery.support import DeliveryHarness, ReceiptFeed, by_id, inline, struct

S = message_pb2
R = DeliveryReceipt
ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "twilio-auth-token-1"
APP_SECRET = "meta-app-secret-1"
VERIFY_TOKEN = "verify-me-please"
BOUNCE_SECRET = "bounce-secret-0123456789"


def _phone() -> str:
    # A valid NANP number: the exchange starts with 2-9 (555 avoided: fictional numbers).
    return f"+1415{random.randint(200, 549)}{random.randint(0, 9999):04d}"


def _text(text: str) -> template_pb2.MessageContent:
    return template_pb2.MessageContent(text=template_pb2.TextContent(text=text))


async def _configure(
    harness: DeliveryHarness, channel: int, credentials: dict[str, object]
) -> None:
    await harness.delivery.UpdateChannelConfig(
        dpb.UpdateChannelConfigRequest(
            channel_config=channel_pb2.ChannelConfig(
                channel=channel,  # type: ignore[arg-type]
                credentials=struct(credentials),
                rate_limit_per_second=1000,
            )
        ),
        metadata=harness.server,
    )


async def _configure_twilio(harness: DeliveryHarness, endpoint: str) -> None:
    """SMS through the local Twilio at ``endpoint``."""
    await _configure(
        harness,
        channel_pb2.CHANNEL_SMS,
        {
            "account_sid": ACCOUNT_SID,
            "auth_token": AUTH_TOKEN,
            "from_number": "+14155550100",
            "endpoint": endpoint,
        },
    )


async def _recipients(
    harness: DeliveryHarness, kind: int, addresses: list[str]
) -> list[tuple[str, str]]:
    """(user id, subscription id) per address."""
    out = []
    for address in addresses:
        user = await harness.user()
        subscription = await harness.subscribe(user.user_id, kind, address)
        out.append((user.user_id, subscription.subscription_id))
    return out


async def _subscription(harness: DeliveryHarness, subscription_id: str) -> spb.Subscription:
    return await harness.identity.GetSubscription(  # type: ignore[no-any-return]
        ipb.GetSubscriptionRequest(subscription_id=subscription_id), metadata=harness.server
    )


async def _wait_disabled(harness: DeliveryHarness, subscription_id: str) -> spb.Subscription:
    deadline = datetime.now(UTC) + timedelta(seconds=30)
    while True:
        found = await _subscription(harness, subscription_id)
        if not found.enabled:
            return found
        assert datetime.now(UTC) < deadline, "identity never disabled the subscription"
        await asyncio.sleep(0.2)


def _statuses(message: message_pb2.Message) -> list[tuple[int, str]]:
    return [(change.status, change.reason) for change in message.timeline]


async def test_twilio_status_callbacks(harness: DeliveryHarness) -> None:
    """Twilio posts signed callbacks to the per-message URL delivery gave it: delivered is
    DELIVERED, an unknown handset (30005) a bounce that disables the number; a forged or
    repeated callback changes nothing."""
    async with FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as twilio:
        await _configure_twilio(harness, twilio.url)
        numbers = [_phone(), _phone()]
        (reached, _), (dead, dead_subscription) = await _recipients(
            harness, spb.SUBSCRIPTION_TYPE_SMS, numbers
        )
        spec = inline(channel_pb2.CHANNEL_SMS, _text("Your code is 1234"))
        async with ReceiptFeed(harness.app.app_id) as feed:
            ok = (await harness.send([by_id(reached)], spec)).results[0].message_id
            gone = (await harness.send([by_id(dead)], spec)).results[0].message_id
            await harness.wait_status(ok, S.MESSAGE_STATUS_SENT)
            await harness.wait_status(gone, S.MESSAGE_STATUS_SENT)
            sms = {item.to: item for item in twilio.sent}
            first, second = sms[numbers[0]], sms[numbers[1]]
            base = f"http://127.0.0.1:{harness.tracking_port}/p/twilio/"
            assert first.status_callback.startswith(base)
            assert first.status_callback != second.status_callback

            assert (await twilio.report_status(first, "sent")).status_code == 200
            forged = await twilio.report_status(first, "delivered", auth_token="not-the-token")
            assert forged.status_code == 403
            assert (await harness.message(ok)).status == S.MESSAGE_STATUS_SENT

            for _ in range(2):  # Twilio may repeat a callback
                assert (await twilio.report_status(first, "delivered")).status_code == 200
            delivered = await harness.wait_status(ok, S.MESSAGE_STATUS_DELIVERED)
            assert _statuses(delivered)[-2:] == [
                (S.MESSAGE_STATUS_SENT, ""),
                (S.MESSAGE_STATUS_DELIVERED, ""),
            ]
            assert delivered.timeline[-1].detail == "twilio:delivered"

            answer = await twilio.report_status(second, "undelivered", "30005")
            assert answer.status_code == 200
            bounced = await harness.wait_status(gone, S.MESSAGE_STATUS_BOUNCED)
            assert bounced.timeline[-1].detail == "twilio:undelivered 30005"
            await feed.until(lambda _: bool(feed.of(ok, R.STATUS_DELIVERED) and feed.of(gone, 8)))
        assert len(feed.of(ok, R.STATUS_DELIVERED)) == 1
        [bounce] = feed.of(gone, R.STATUS_BOUNCED)
        assert (bounce.token_invalid, bounce.reason, bounce.channel) == (True, "BOUNCED", "sms")
        assert bounce.subscription_id == dead_subscription
        found = await _wait_disabled(harness, dead_subscription)
        assert found.disabled_reason == "twilio:undelivered 30005"


async def test_whatsapp_status_webhooks(harness: DeliveryHarness) -> None:
    """The Meta webhook handshake, then signed status webhooks: delivered and read (an open),
    failed 131026 (not on WhatsApp) bounces and disables the number; unsigned or forged
    webhooks are refused; statuses of messages delivery never sent are ignored."""
    async with FakeWhatsApp("106540352242922", "EAAG-token") as meta:
        await _configure(
            harness,
            channel_pb2.CHANNEL_WHATSAPP,
            {
                "access_token": "EAAG-token",
                "phone_number_id": "106540352242922",
                "endpoint": meta.url,
                "app_secret": APP_SECRET,
                "webhook_verify_token": VERIFY_TOKEN,
            },
        )
        hook = f"http://127.0.0.1:{harness.tracking_port}/p/whatsapp/{harness.app.app_id}"
        handshake = await meta.verify_webhook(hook, VERIFY_TOKEN)
        assert (handshake.status_code, handshake.text) == (200, "8f3")
        assert (await meta.verify_webhook(hook, "wrong")).status_code == 403

        (reader, _), (stranger, stranger_subscription) = await _recipients(
            harness, spb.SUBSCRIPTION_TYPE_WHATSAPP, [_phone(), _phone()]
        )
        spec = inline(channel_pb2.CHANNEL_WHATSAPP, _text("Your order shipped"))
        async with ReceiptFeed(harness.app.app_id) as feed:
            read = (await harness.send([by_id(reader)], spec)).results[0].message_id
            lost = (await harness.send([by_id(stranger)], spec)).results[0].message_id
            read_message = await harness.wait_status(read, S.MESSAGE_STATUS_SENT)
            lost_message = await harness.wait_status(lost, S.MESSAGE_STATUS_SENT)
            read_wamid = read_message.provider_message_id
            assert read_wamid.startswith("wamid.")

            forged = await meta.post_statuses(hook, "another-secret", [(read_wamid, "read", None)])
            assert forged.status_code == 403
            answer = await meta.post_statuses(
                hook,
                APP_SECRET,
                [
                    (read_wamid, "sent", None),
                    (read_wamid, "delivered", None),
                    (read_wamid, "read", None),
                    ("wamid.not-ours", "delivered", None),
                    (lost_message.provider_message_id, "failed", 131026),
                ],
            )
            assert answer.status_code == 200
            opened = await harness.wait_status(read, S.MESSAGE_STATUS_OPENED)
            assert _statuses(opened)[-3:] == [
                (S.MESSAGE_STATUS_SENT, ""),
                (S.MESSAGE_STATUS_DELIVERED, ""),
                (S.MESSAGE_STATUS_OPENED, "READ"),
            ]
            bounced = await harness.wait_status(lost, S.MESSAGE_STATUS_BOUNCED)
            assert bounced.timeline[-1].detail.startswith("whatsapp:failed 131026")
            await feed.until(lambda _: bool(feed.of(read, R.STATUS_OPENED) and feed.of(lost, 8)))
        assert [r.status for r in feed.of(read)] == [
            R.STATUS_SENT,
            R.STATUS_DELIVERED,
            R.STATUS_OPENED,
        ]
        [bounce] = feed.of(lost, R.STATUS_BOUNCED)
        assert bounce.token_invalid
        await _wait_disabled(harness, stranger_subscription)


def _signed(body: bytes, secret: str = BOUNCE_SECRET) -> dict[str, str]:
    stamp = int(time.time())
    mac = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return {"x-tidings-signature": f"t={stamp},v1={mac}", "content-type": "message/rfc822"}


def _dsn(original_headers: str, recipient: str, status: str, diagnostic: str) -> bytes:
    """A bounce as Postfix writes it (RFC 3464), quoting the original headers."""
    return (
        "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\n"
        "To: bounces@acme.example\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B1"\r\n'
        "\r\n--B1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        "I'm sorry to have to inform you that your message could not be delivered.\r\n"
        "\r\n--B1\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.net\r\n"
        "Arrival-Date: Tue, 24 Nov 2026 09:00:00 +0000\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\n"
        f"Original-Recipient: rfc822;{recipient}\r\n"
        "Action: failed\r\n"
        f"Status: {status}\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n"
        "\r\n--B1\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"{original_headers}\r\n"
        "--B1--\r\n"
    ).encode()


def _complaint(original: bytes) -> bytes:
    """An abuse report from a mailbox provider's feedback loop (RFC 5965)."""
    return (
        b"From: staff@hotmail.example\r\nTo: abuse@acme.example\r\nSubject: complaint\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=feedback-report; boundary="F1"\r\n'
        b"\r\n--F1\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n"
        b"\r\n--F1\r\nContent-Type: message/feedback-report\r\n\r\n"
        b"Feedback-Type: abuse\r\nUser-Agent: SomeFBL/1.0\r\nVersion: 1\r\n"
        b"\r\n--F1\r\nContent-Type: message/rfc822\r\n\r\n" + original + b"\r\n--F1--\r\n"
    )


async def test_email_bounces_and_complaints(harness: DeliveryHarness) -> None:
    """A signed DSN of a 5.1.1 bounce makes the message BOUNCED and identity disable the
    address; a 5.7.1 policy bounce is a bounce that keeps the address; a feedback-loop
    complaint unsubscribes the address in identity; unsigned or malformed posts are refused."""
    async with FakeSmtpServer() as smtp:
        await _configure(
            harness,
            channel_pb2.CHANNEL_EMAIL,
            {
                "host": "127.0.0.1",
                "port": smtp.port,
                "security": "none",
                "from_address": "Acme <news@acme.example>",
                "bounce_secret": BOUNCE_SECRET,
            },
        )
        addresses = [f"{name}.{uuid.uuid4().hex[:8]}@example.com" for name in "abc"]
        recipients = await _recipients(harness, spb.SUBSCRIPTION_TYPE_EMAIL, addresses)
        spec = inline(
            channel_pb2.CHANNEL_EMAIL,
            template_pb2.MessageContent(email=template_pb2.EmailContent(subject="Hi", text="t")),
        )
        async with ReceiptFeed(harness.app.app_id) as feed:
            ids = [
                (await harness.send([by_id(user_id)], spec)).results[0].message_id
                for user_id, _ in recipients
            ]
            for message_id in ids:
                await harness.wait_status(message_id, S.MESSAGE_STATUS_SENT)
            mails = {mail.rcpt_tos[0]: mail for mail in smtp.received}
            headers = [
                mails[address].raw.split(b"\r\n\r\n", 1)[0].decode() for address in addresses
            ]
            url = f"http://127.0.0.1:{harness.tracking_port}/p/email/{harness.app.app_id}"
            hard = _dsn(headers[0], addresses[0], "5.1.1", "550 5.1.1 User unknown")
            policy = _dsn(headers[1], addresses[1], "5.7.1", "550 5.7.1 Message rejected as spam")
            async with httpx.AsyncClient() as client:
                unsigned = await client.post(url, content=hard)
                forged = await client.post(url, content=hard, headers=_signed(hard, "nope"))
                assert (unsigned.status_code, forged.status_code) == (403, 403)
                junk = b"Subject: hello\r\n\r\nnot a report"
                assert (
                    await client.post(url, content=junk, headers=_signed(junk))
                ).status_code == 400
                for body in (hard, hard, policy):  # the mailbox reader may post twice
                    answer = await client.post(url, content=body, headers=_signed(body))
                    assert answer.status_code == 200
                complaint = _complaint(mails[addresses[2]].raw)
                answer = await client.post(url, content=complaint, headers=_signed(complaint))
                assert answer.status_code == 200
            bounced = await harness.wait_status(ids[0], S.MESSAGE_STATUS_BOUNCED)
            assert _statuses(bounced).count((S.MESSAGE_STATUS_BOUNCED, "BOUNCED")) == 1
            assert bounced.timeline[-1].detail == "email:failed 5.1.1 smtp; 550 5.1.1 User unknown"
            await harness.wait_status(ids[1], S.MESSAGE_STATUS_BOUNCED)
            complained = await harness.wait_status(ids[2], S.MESSAGE_STATUS_UNSUBSCRIBED)
            assert complained.timeline[-1].reason == "COMPLAINT"
            await feed.until(lambda _: all(feed.of(i, R.STATUS_BOUNCED) for i in ids[:2]))
            await feed.until(lambda _: bool(feed.of(ids[2], R.STATUS_UNSUBSCRIBED)))
        [hard_receipt] = feed.of(ids[0], R.STATUS_BOUNCED)
        [soft_receipt] = feed.of(ids[1], R.STATUS_BOUNCED)
        assert (hard_receipt.token_invalid, soft_receipt.token_invalid) == (True, False)
        await _wait_disabled(harness, recipients[0][1])
        assert (await _subscription(harness, recipients[1][1])).enabled
        complainer = await _subscription(harness, recipients[2][1])
        assert complainer.opt_in == spb.OPT_IN_STATE_UNSUBSCRIBED
