"""The issue's story, end to end: identity, delivery and journey as separate processes, real
Postgres and Kafka, local provider servers (a Telegram Bot API endpoint for the push step, an
SMTP server for email, a Twilio endpoint for SMS).

1. A CSV of customers enters a journey: a push goes out; half of them click it (reported to
   delivery with ReportEngagement, as an SDK would); clickers get an email, the others wait
   (a short timeout stands in for the day) and get an SMS.
2. ``add_to_cart`` starts a retargeting journey; a ``purchase`` of the same cart cancels the
   reminder, the other cart gets it.
3. A birthday journey sends on the customer's local birthday only.

Per-node statistics match what the provider servers received, exactly.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import grpc.aio
import pytest
from google.type import date_pb2, timeofday_pb2
from tidings.delivery.v1 import channel_pb2, delivery_service_pb2_grpc, template_pb2
from tidings.delivery.v1 import delivery_service_pb2 as dpb
from tidings.identity.v1 import identity_service_pb2 as ipb
from tidings.identity.v1 import subscription_pb2 as spb
from tidings.identity.v1 import user_pb2, user_ref_pb2
from tidings.journey.v1 import journey_pb2 as jpb
from tidings.journey.v1 import journey_service_pb2 as pb

from tests.conftest import temporary_database
from tests.delivery.providers.fakes.smtp import FakeSmtpServer
from tests.delivery.providers.fakes.twilio import FakeTwilio
from tests.delivery.sink import Sink
from tests.delivery.support import delivery_env, struct
from tests.e2e.processes import ServiceProcess, running_service
from tests.identity.conftest import TestApp
from tests.journey.support import (
    create_active,
    definition,
    event_entry,
    exit_node,
    journey_process,
    journey_stub,
    node,
    seconds,
)
from tests.journey.test_customers import _upload
from tests.journey.test_facts import track
from tests.polling import eventually

ACCOUNT_SID = "AC" + "0" * 32
CUSTOMERS = 6


@pytest.fixture
async def stack(identity_service: ServiceProcess, tmp_path: Path) -> AsyncIterator[tuple[Any, Any]]:
    """Delivery and journey processes on their own databases; their stubs."""
    env, _ = delivery_env(identity_service.grpc_target)
    async with (
        temporary_database() as delivery_dsn,
        temporary_database() as journey_dsn,
        running_service("delivery", database_url=delivery_dsn, log_dir=tmp_path, env=env) as d,
    ):
        await d.wait_serving()
        async with (
            journey_process(
                identity_service, journey_dsn, tmp_path, delivery_target=d.grpc_target
            ) as j,
            grpc.aio.insecure_channel(d.grpc_target) as dch,
            grpc.aio.insecure_channel(j.grpc_target) as jch,
        ):
            yield delivery_service_pb2_grpc.DeliveryServiceStub(dch), journey_stub(jch)


def send(node_id: str, template_id: str, channel: str, **wiring: str) -> jpb.Node:
    return node(
        node_id,
        send=jpb.SendNode(template_id=template_id, channels=[channel]),
        next=wiring,
    )


async def _template(delivery: Any, app: TestApp, channel: int, content: Any) -> str:
    created = await delivery.CreateTemplate(
        dpb.CreateTemplateRequest(
            template=template_pb2.Template(
                display_name=f"t-{uuid.uuid4().hex[:8]}",
                channel=channel,  # type: ignore[arg-type]
                content=content,
            )
        ),
        metadata=app.server,
    )
    return str(created.template_id)


async def _channels(delivery: Any, app: TestApp, bot: Sink, smtp: Any, sms: Any) -> None:
    configs = [
        (channel_pb2.CHANNEL_TELEGRAM, {"bot_token": "123456:test-token", "endpoint": bot.url}),
        (
            channel_pb2.CHANNEL_EMAIL,
            {
                "host": "127.0.0.1",
                "port": smtp.port,
                "security": "none",
                "from_address": "Acme <news@acme.example>",
            },
        ),
        (
            channel_pb2.CHANNEL_SMS,
            {
                "account_sid": ACCOUNT_SID,
                "auth_token": "secret-token",
                "from_number": "+14155550100",
                "endpoint": sms.url,
            },
        ),
    ]
    for channel, credentials in configs:
        await delivery.UpdateChannelConfig(
            dpb.UpdateChannelConfigRequest(
                channel_config=channel_pb2.ChannelConfig(
                    channel=channel,
                    credentials=struct(credentials),
                    rate_limit_per_second=1000,
                )
            ),
            metadata=app.server,
        )


async def _customer(
    users: Any, app: TestApp, *, birthdate: date_pb2.Date | None = None, zone: str = ""
) -> tuple[str, str, dict[str, str]]:
    """A customer with telegram, email and SMS subscriptions: (user id, external id, subs)."""
    external_id = f"crm-{uuid.uuid4().hex[:10]}"
    user = user_pb2.User(first_name="Ana", timezone=zone)
    if birthdate is not None:
        user.birthdate.CopyFrom(birthdate)
    created = await users.UpsertUser(
        ipb.UpsertUserRequest(ref=user_ref_pb2.UserRef(external_id=external_id), user=user),
        metadata=app.server,
    )
    user_id = created.user.user_id
    tokens = {
        spb.SUBSCRIPTION_TYPE_TELEGRAM: str(10**9 + secrets.randbelow(10**9)),
        spb.SUBSCRIPTION_TYPE_EMAIL: f"ana.{uuid.uuid4().hex[:8]}@example.com",
        spb.SUBSCRIPTION_TYPE_SMS: f"+346{secrets.randbelow(10**8):08d}",
    }
    subscriptions = {}
    for kind, token in tokens.items():
        sub = await users.CreateSubscription(
            ipb.CreateSubscriptionRequest(
                subscription=spb.Subscription(
                    type=kind, token=token, opt_in=spb.OPT_IN_STATE_SUBSCRIBED
                ),
                user=user_ref_pb2.UserRef(user_id=user_id),
            ),
            metadata=app.server,
        )
        subscriptions[spb.SubscriptionType.Name(kind)] = sub.subscription_id
    return user_id, external_id, subscriptions


async def _journey_messages(delivery: Any, app: TestApp, user_id: str) -> list[Any]:
    response = await delivery.ListMessages(
        dpb.ListMessagesRequest(user=user_ref_pb2.UserRef(user_id=user_id)), metadata=app.server
    )
    return [m for m in response.messages if "/" in m.idempotency_key]


async def _stats(journeys: Any, app: TestApp, journey_id: str) -> dict[str, Any]:
    stats = await journeys.GetJourneyStats(
        pb.GetJourneyStatsRequest(journey_id=journey_id), metadata=app.server
    )
    return {n.node_id: n for n in stats.nodes}


async def test_the_story(stack: tuple[Any, Any], users: Any, app: TestApp) -> None:
    delivery, journeys = stack
    async with (
        Sink() as bot,
        FakeSmtpServer() as smtp,
        FakeTwilio(ACCOUNT_SID, "secret-token") as sms,
    ):
        await _channels(delivery, app, bot, smtp, sms)
        text = template_pb2.MessageContent(
            text=template_pb2.TextContent(text="Hi {{ user.first_name }}")
        )
        push_t = await _template(delivery, app, channel_pb2.CHANNEL_TELEGRAM, text)
        sms_t = await _template(delivery, app, channel_pb2.CHANNEL_SMS, text)
        email_t = await _template(
            delivery,
            app,
            channel_pb2.CHANNEL_EMAIL,
            template_pb2.MessageContent(
                email=template_pb2.EmailContent(subject="Thanks", text="Thanks for clicking")
            ),
        )

        # -- 1. CSV → push → half click → email / SMS -----------------------------------------
        people = [await _customer(users, app) for _ in range(CUSTOMERS)]
        welcome = await create_active(
            journeys,
            app.server,
            definition(
                send("push", push_t, "telegram", next="clicked"),
                node(
                    "clicked",
                    wait_for_event=jpb.WaitForEventNode(
                        engagement=jpb.Engagement(
                            send_node_id="push", kind=jpb.Engagement.KIND_CLICKED
                        ),
                        timeout=seconds(12),
                    ),
                    next={"event": "email", "timeout": "sms"},
                ),
                send("email", email_t, "email", next="end"),
                send("sms", sms_t, "sms", next="end"),
                exit_node("end"),
            ),
        )
        csv = "customerId\n" + "\n".join(external for _, external, _ in people) + "\n"
        uploaded = await _upload(journeys, app, welcome.journey_id, csv.encode(), "story-csv")
        assert (uploaded.rows, uploaded.entered) == (CUSTOMERS, CUSTOMERS)

        async def pushed() -> bool:
            return bot.count >= CUSTOMERS

        await eventually(pushed, what="every push at the Telegram endpoint")
        clickers = people[: CUSTOMERS // 2]
        for user_id, _, subs in clickers:

            async def messages(user: str = user_id) -> list[Any]:
                return await _journey_messages(delivery, app, user)

            [message] = await eventually(messages, what="the push message")
            await delivery.ReportEngagement(
                dpb.ReportEngagementRequest(
                    message_id=message.message_id,
                    subscription_id=subs["SUBSCRIPTION_TYPE_TELEGRAM"],
                    kind=dpb.ENGAGEMENT_KIND_CLICKED,
                    url="app://offer",
                ),
                metadata=app.client,
            )

        async def finished() -> bool:
            return len(smtp.received) >= len(clickers) and len(sms.sent) >= CUSTOMERS - len(
                clickers
            )

        await eventually(finished, within=60, what="emails to clickers and SMS to the others")

        # -- 2. add_to_cart → retargeting; a matching purchase cancels the reminder -------------
        reminder_t = await _template(delivery, app, channel_pb2.CHANNEL_SMS, text)
        cart = await create_active(
            journeys,
            app.server,
            definition(
                node(
                    "cart",
                    retarget=jpb.RetargetNode(
                        goal_event="purchase", correlation_property="cart_id", window=seconds(4)
                    ),
                    next={"converted": "end", "reminder": "remind"},
                ),
                send("remind", reminder_t, "sms", next="end"),
                exit_node("end"),
                entry=event_entry("add_to_cart"),
            ),
        )
        (buyer, _, _), (idler, _, _) = people[0], people[1]
        sms_before = len(sms.sent)
        await track(
            users,
            app,
            (buyer, "add_to_cart", {"cart_id": "A"}, str(uuid.uuid4())),
            (idler, "add_to_cart", {"cart_id": "B"}, str(uuid.uuid4())),
        )

        async def both_wait_for_their_cart() -> bool:
            for user_id in (buyer, idler):
                try:
                    state = await journeys.GetCustomerState(
                        pb.GetCustomerStateRequest(
                            journey_id=cart.journey_id,
                            customer=user_ref_pb2.UserRef(user_id=user_id),
                        ),
                        metadata=app.server,
                    )
                except grpc.aio.AioRpcError:
                    return False  # not entered yet
                if state.node_id != "cart":
                    return False
            return True

        await eventually(
            both_wait_for_their_cart, within=20, what="both carts at the retarget node"
        )
        await track(users, app, (buyer, "purchase", {"cart_id": "A"}, str(uuid.uuid4())))

        async def reminded() -> bool:
            nodes = await _stats(journeys, app, cart.journey_id)
            outputs = {o.output: o.count for o in nodes["cart"].outputs}
            return outputs == {"converted": 1, "reminder": 1} and len(sms.sent) > sms_before

        await eventually(reminded, within=40, what="one reminder and one conversion")

        # -- 3. birthdays on the local day --------------------------------------------------
        kiritimati = datetime.now(UTC).astimezone(ZoneInfo("Pacific/Kiritimati")).date()
        # A leap year of birth, so that a February 29 in Kiritimati is a real birthday too.
        today = date_pb2.Date(year=1992, month=kiritimati.month, day=kiritimati.day)
        celebrating = await _customer(users, app, birthdate=today, zone="Pacific/Kiritimati")
        # 25 hours behind Kiritimati: that date is tomorrow (or later) there.
        waiting = await _customer(users, app, birthdate=today, zone="Pacific/Pago_Pago")
        birthday_t = await _template(delivery, app, channel_pb2.CHANNEL_TELEGRAM, text)
        birthday = await create_active(
            journeys,
            app.server,
            definition(
                send("cake", birthday_t, "telegram", next="end"),
                exit_node("end"),
                entry=jpb.Entry(
                    birthday=jpb.Entry.Birthday(local_time=timeofday_pb2.TimeOfDay(hours=0))
                ),
            ),
        )

        async def celebrated() -> bool:
            nodes = await _stats(journeys, app, birthday.journey_id)
            return bool(nodes["cake"].sent >= 1)

        await eventually(celebrated, within=40, what="the birthday send")
        await asyncio.sleep(2)
        cake = await _stats(journeys, app, birthday.journey_id)
        assert cake["cake"].sent == 1
        assert await _journey_messages(delivery, app, waiting[0]) == []
        [cake_message] = await _journey_messages(delivery, app, celebrating[0])
        assert cake_message.template_id == birthday_t

        # -- statistics match the provider servers exactly -----------------------------------
        async def settled() -> dict[str, Any] | None:
            nodes = await _stats(journeys, app, welcome.journey_id)
            return nodes if nodes["push"].clicked >= len(clickers) else None

        nodes = await eventually(settled, within=40, what="receipts in the statistics")
        assert nodes is not None
        pushes = [r for r in bot.received if r.path.endswith("/sendMessage")]
        welcome_sms = sms.sent[:sms_before]
        assert nodes["push"].sent == CUSTOMERS
        assert len(pushes) == CUSTOMERS + 1  # + the birthday's
        assert nodes["push"].clicked == len(clickers)
        assert {o.output: o.count for o in nodes["clicked"].outputs} == {
            "event": len(clickers),
            "timeout": CUSTOMERS - len(clickers),
        }
        assert nodes["email"].sent == len(smtp.received) == len(clickers)
        assert nodes["sms"].sent == len(welcome_sms) == CUSTOMERS - len(clickers)
        # The retargeting reminder: one SMS, to the customer whose cart was not bought.
        reminders = sms.sent[sms_before:]
        retarget = await _stats(journeys, app, cart.journey_id)
        assert retarget["remind"].sent == len(reminders) == 1
        assert [m.message_id for m in await _journey_messages(delivery, app, buyer)] != []
        idler_messages = await _journey_messages(delivery, app, idler)
        assert reminder_t in {m.template_id for m in idler_messages}
