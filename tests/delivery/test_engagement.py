"""Engagement: an email's tracked links and open pixel through the HTTP endpoint, one-click
unsubscribe (opting out in identity), and ReportEngagement from an SDK (own subscription only).
Each becomes a timeline entry and a delivery.receipts fact."""

from __future__ import annotations

import asyncio
import base64
import re
import uuid

import grpc
from tidings.delivery.v1 import channel_pb2, message_pb2, template_pb2
from tidings.delivery.v1 import delivery_service_pb2 as dpb
from tidings.events.v1.delivery_receipt_pb2 import DeliveryReceipt
from tidings.identity.v1 import identity_service_pb2 as ipb
from tidings.identity.v1 import subscription_pb2 as spb

from services.delivery.secrets_box import SecretBox
from services.delivery.tracking import Tracked, TrackingLinks
from tests.delivery.providers.fakes.smtp import FakeSmtpServer
from tests.delivery.sink import Sink
from tests.delivery.support import DeliveryHarness, ReceiptFeed, by_id, ext, inline, struct, webhook
from tests.identity.support import failure

S = message_pb2
HTML = (
    '<html><body><p>Hi</p><a href="https://shop.example/sale?x=1&amp;y=2">Sale</a>'
    '<a href="https://tienda.example/ofertas/10€">Oferta</a></body></html>'
)


async def _http(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def _email_setup(harness: DeliveryHarness, smtp: FakeSmtpServer) -> tuple[str, str]:
    await harness.delivery.UpdateChannelConfig(
        dpb.UpdateChannelConfigRequest(
            channel_config=channel_pb2.ChannelConfig(
                channel=channel_pb2.CHANNEL_EMAIL,
                credentials=struct(
                    {
                        "host": "127.0.0.1",
                        "port": smtp.port,
                        "security": "none",
                        "from_address": "Acme <news@acme.example>",
                    }
                ),
            )
        ),
        metadata=harness.server,
    )
    user = await harness.user(first_name="Ana")
    address = f"ana.{uuid.uuid4().hex[:8]}@example.com"
    subscription = await harness.subscribe(user.user_id, spb.SUBSCRIPTION_TYPE_EMAIL, address)
    return user.user_id, subscription.subscription_id


async def test_email_links_and_pixel_are_tracked(harness: DeliveryHarness) -> None:
    async with FakeSmtpServer() as smtp, ReceiptFeed(harness.app.app_id) as feed:
        user_id, _ = await _email_setup(harness, smtp)
        spec = inline(
            channel_pb2.CHANNEL_EMAIL,
            template_pb2.MessageContent(
                email=template_pb2.EmailContent(subject="Hi {{ user.first_name }}", html=HTML)
            ),
        )
        [result] = (await harness.send([by_id(user_id)], spec)).results
        await harness.wait_status(result.message_id, S.MESSAGE_STATUS_SENT)
        [mail] = smtp.received
        message = mail.message
        assert message["Subject"] == "Hi Ana"
        assert "/u/" in message["List-Unsubscribe"]
        html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
        [link, offer] = re.findall(r'href="(http://127\.0\.0\.1:\d+/c/[^"]+)"', html)
        [pixel] = re.findall(r'src="(http://127\.0\.0\.1:\d+/o/[^"]+)"', html)
        assert "shop.example" not in html
        status, headers, body = await _http(
            harness.tracking_port, "GET", pixel.split(":", 2)[2][5:]
        )
        assert (status, headers["content-type"], body[:3]) == (200, "image/gif", b"GIF")
        opened = await harness.wait_status(result.message_id, S.MESSAGE_STATUS_OPENED)
        assert opened.timeline[-1].status == S.MESSAGE_STATUS_OPENED
        status, headers, _ = await _http(harness.tracking_port, "GET", link.split(":", 2)[2][5:])
        assert status == 302
        assert headers["location"] == "https://shop.example/sale?x=1&y=2"
        clicked = await harness.wait_status(result.message_id, S.MESSAGE_STATUS_CLICKED)
        assert clicked.timeline[-1].detail == "https://shop.example/sale?x=1&y=2"
        await feed.until(lambda _: bool(feed.of(result.message_id, DeliveryReceipt.STATUS_CLICKED)))
        [click] = feed.of(result.message_id, DeliveryReceipt.STATUS_CLICKED)
        assert click.url == "https://shop.example/sale?x=1&y=2"
        assert feed.of(result.message_id, DeliveryReceipt.STATUS_OPENED)
        # A link beyond ASCII redirects too: the Location header carries it percent-encoded.
        status, headers, _ = await _http(harness.tracking_port, "GET", offer.split(":", 2)[2][5:])
        assert (status, headers["location"]) == (
            302,
            "https://tienda.example/ofertas/10%E2%82%AC",
        )
        # The pixel's token travels with a forwarded email: it opens, never unsubscribes.
        status, _, _ = await _http(harness.tracking_port, "POST", "/u/" + pixel.rsplit("/o/", 1)[1])
        assert status == 404


async def test_forged_or_foreign_tracking_tokens_are_404(harness: DeliveryHarness) -> None:
    for path in ("/c/abc.def", "/o/", "/x/whatever", "/c/" + "A" * 40 + "." + "B" * 22):
        status, _, _ = await _http(harness.tracking_port, "GET", path)
        assert status == 404


async def test_one_click_unsubscribe_opts_out_in_identity(harness: DeliveryHarness) -> None:
    async with FakeSmtpServer() as smtp:
        user_id, subscription_id = await _email_setup(harness, smtp)
        spec = inline(
            channel_pb2.CHANNEL_EMAIL,
            template_pb2.MessageContent(email=template_pb2.EmailContent(subject="s", text="t")),
        )
        [result] = (await harness.send([by_id(user_id)], spec)).results
        await harness.wait_status(result.message_id, S.MESSAGE_STATUS_SENT)
        [mail] = smtp.received
        unsubscribe = re.search(r"<(http://[^>]+/u/[^>]+)>", mail.message["List-Unsubscribe"])
        assert unsubscribe is not None
        path = "/" + unsubscribe.group(1).split("/", 3)[3]
        status, _, page = await _http(harness.tracking_port, "GET", path)
        assert status == 200
        assert b"<form method=post" in page
        # The mail client's one-click POST, then the reader's own: unsubscribed once.
        for _ in range(2):
            status, _, _ = await _http(harness.tracking_port, "POST", path)
            assert status == 200
        unsubscribed = await harness.wait_status(result.message_id, S.MESSAGE_STATUS_UNSUBSCRIBED)
        assert [e.status for e in unsubscribed.timeline].count(S.MESSAGE_STATUS_UNSUBSCRIBED) == 1
        subscription = await harness.identity.GetSubscription(
            ipb.GetSubscriptionRequest(subscription_id=subscription_id), metadata=harness.server
        )
        assert subscription.opt_in == spb.OPT_IN_STATE_UNSUBSCRIBED
        # The next send to that address is refused by policy.
        [again] = (await harness.send([by_id(user_id)], spec)).results
        failed = await harness.wait_status(again.message_id, S.MESSAGE_STATUS_FAILED)
        assert failed.timeline[-1].reason == "NOT_OPTED_IN"
        assert len(smtp.received) == 1


async def test_sdk_reports_opens_and_clicks_for_its_own_subscription(
    harness: DeliveryHarness, sink: Sink
) -> None:
    await harness.telegram_channel(sink.url)
    user = await harness.user()
    mine = await harness.subscribe(user.user_id, spb.SUBSCRIPTION_TYPE_TELEGRAM, "123456789")
    spec = inline(
        channel_pb2.CHANNEL_TELEGRAM,
        template_pb2.MessageContent(text=template_pb2.TextContent(text="hi")),
    )
    [result] = (await harness.send([by_id(user.user_id)], spec)).results
    await harness.wait_status(result.message_id, S.MESSAGE_STATUS_SENT)
    async with ReceiptFeed(harness.app.app_id) as feed:
        answer = await harness.delivery.ReportEngagement(
            dpb.ReportEngagementRequest(
                message_id=result.message_id,
                subscription_id=mine.subscription_id,
                kind=dpb.ENGAGEMENT_KIND_CLICKED,
                url="app://offers/1",
            ),
            metadata=harness.client,
        )
        assert answer.status == S.MESSAGE_STATUS_CLICKED
        opened = await harness.delivery.ReportEngagement(
            dpb.ReportEngagementRequest(
                message_id=result.message_id,
                subscription_id=mine.subscription_id,
                kind=dpb.ENGAGEMENT_KIND_OPENED,
            ),
            metadata=harness.client,
        )
        assert opened.status == S.MESSAGE_STATUS_CLICKED  # never moves back
        await feed.until(lambda _: len(feed.of(result.message_id)) >= 2)
    # Someone else's subscription, an unknown message, a bad request:
    other = await failure(
        harness.delivery.ReportEngagement(
            dpb.ReportEngagementRequest(
                message_id=result.message_id,
                subscription_id=str(uuid.uuid4()),
                kind=dpb.ENGAGEMENT_KIND_OPENED,
            ),
            metadata=harness.client,
        )
    )
    assert (other.code, other.reason) == (grpc.StatusCode.NOT_FOUND, "MESSAGE_NOT_FOUND")
    bad = await failure(
        harness.delivery.ReportEngagement(
            dpb.ReportEngagementRequest(message_id="x"), metadata=harness.client
        )
    )
    assert bad.fields == ["message_id", "subscription_id", "kind"]


async def test_list_messages_per_user_newest_first(harness: DeliveryHarness, sink: Sink) -> None:
    await harness.webhook_channel()
    user = await harness.user()
    spec = inline(channel_pb2.CHANNEL_WEBHOOK, webhook(f"{sink.url}/x"))
    ids = [
        (await harness.send([by_id(user.user_id)], spec)).results[0].message_id for _ in range(3)
    ]
    for message_id in ids:
        await harness.wait_status(message_id, S.MESSAGE_STATUS_SENT)
    first = await harness.delivery.ListMessages(
        dpb.ListMessagesRequest(user=by_id(user.user_id), page_size=2), metadata=harness.server
    )
    second = await harness.delivery.ListMessages(
        dpb.ListMessagesRequest(
            user=by_id(user.user_id), page_size=2, page_token=first.next_page_token
        ),
        metadata=harness.server,
    )
    listed = [m.message_id for m in first.messages] + [m.message_id for m in second.messages]
    assert listed == list(reversed(ids))
    assert all(m.timeline[-1].status == S.MESSAGE_STATUS_SENT for m in first.messages)
    by_external = await harness.delivery.ListMessages(
        dpb.ListMessagesRequest(user=ext(user.external_id)),
        metadata=harness.server,
    )
    assert len(by_external.messages) == 3


def test_tracking_tokens_are_bound_to_their_purpose_and_old_ones_still_work() -> None:
    links = TrackingLinks(SecretBox("tracking-test-key"), "https://t.example")
    message_id = uuid.uuid4()
    opened = links.open_url("app_1", message_id).rsplit("/", 1)[1]
    assert links.read(opened, "o") == Tracked("app_1", message_id, "")
    assert links.read(opened, "u") is None
    assert links.read(opened, "p") is None
    # Emails sent before tokens named their purpose carry one token for all of them.
    payload = f"app_1\n{message_id}\n".encode()
    legacy = f"{_b64(payload)}.{_b64(SecretBox('tracking-test-key').sign(payload))}"
    assert links.read(legacy, "u") == links.read(legacy, "o") == Tracked("app_1", message_id, "")
    assert links.read(legacy + "x", "o") is None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
