"""A victim app ("B") with a canary string written into everything it owns.

Each service gets B's data through its own API: a profile (names, email, alias, attributes), a
subscription, an event, a customer field, a segment, an import (with a rejected row), a webhook
channel and template, a sent message, a broadcast, a journey with a customer in it. Every value
a test might see carries :attr:`World.canary`, so grepping an answer for it shows a leak.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

from tidings.delivery.v1 import broadcast_pb2, channel_pb2, template_pb2
from tidings.identity.v1 import customer_field_pb2, segment_pb2, user_pb2
from tidings.identity.v1 import subscription_pb2 as spb
from tidings.journey.v1 import journey_pb2 as jpb

from tests.abuse.conftest import Stack
from tests.abuse.rpc import M
from tests.delivery.sink import Sink
from tests.delivery.support import by_id, struct
from tests.identity.conftest import TestApp, create_test_app
from tests.identity.import_support import STRING, attribute, options, standard, upload
from tests.journey.support import definition, exit_node, node, seconds
from tests.polling import eventually


def make_canary() -> str:
    """A string no test data contains by chance (lower case: emails are folded)."""
    return f"canary{uuid.uuid4().hex[:16]}"


@dataclass
class World:
    """App B's ids, all carrying the canary."""

    app: TestApp
    canary: str
    user_id: str
    external_id: str
    subscription_id: str
    field_name: str
    segment_id: str
    import_id: str
    template_id: str
    message_id: str
    broadcast_id: str
    journey_id: str


async def build_world(stack: Stack, sink: Sink) -> World:
    """App B and its canary-carrying data, in every service."""
    b = await create_test_app(stack.apps)
    canary = make_canary()
    users, deliveries, journeys = stack.users, stack.deliveries, stack.journeys
    external_id = f"ext-{canary}"
    upserted = await users.UpsertUser(
        M.UpsertUserRequest(
            ref={"external_id": external_id},
            user={
                "first_name": canary,
                "last_name": canary,
                "email": f"{canary}@example.com",
                "attributes": {"secret": {"string_value": canary}},
            },
        ),
        metadata=b.server,
    )
    user_id = upserted.user.user_id
    await users.AddAlias(
        M.AddAliasRequest(ref={"user_id": user_id}, alias={"label": "crm", "value": canary}),
        metadata=b.server,
    )
    subscription = await users.CreateSubscription(
        M.CreateSubscriptionRequest(
            subscription=spb.Subscription(
                type=spb.SUBSCRIPTION_TYPE_EMAIL,
                token=f"{canary}@example.com",
                opt_in=spb.OPT_IN_STATE_SUBSCRIBED,
            ),
            user=by_id(user_id),
        ),
        metadata=b.server,
    )
    await users.TrackEvents(
        M.TrackEventsRequest(
            events=[
                M.TrackedEventInput(
                    user=by_id(user_id), name="canary_event", properties=struct({"s": canary})
                )
            ]
        ),
        metadata=b.server,
    )
    field_name = f"f_{uuid.uuid4().hex[:12]}"  # A may use the name: no canary in it
    await users.CreateCustomerField(
        M.CreateCustomerFieldRequest(
            field=customer_field_pb2.CustomerField(
                name=field_name, type=customer_field_pb2.FIELD_TYPE_STRING, description=canary
            )
        ),
        metadata=b.server,
    )
    segment = await users.CreateSegment(
        M.CreateSegmentRequest(
            segment=segment_pb2.Segment(
                display_name=canary,
                description=canary,
                condition=segment_pb2.Condition(
                    attribute=segment_pb2.AttributeCondition(
                        field="attributes.secret",
                        operator=segment_pb2.OPERATOR_EQUALS,
                        values=[user_pb2.AttributeValue(string_value=canary)],
                    )
                ),
            )
        ),
        metadata=b.server,
    )
    job = await upload(
        users,
        b,
        options(standard("first_name"), attribute("secret", STRING), list_name=f"list {canary}"),
        (
            f"id,first_name,secret\r\nimp-{canary},{canary},{canary}\r\n,{canary},{canary}\r\n"
        ).encode(),
    )
    await deliveries.UpdateChannelConfig(
        M.UpdateChannelConfigRequest(
            channel_config=channel_pb2.ChannelConfig(
                channel=channel_pb2.CHANNEL_WEBHOOK,
                credentials=struct({"signing_secret": f"sig-{canary}", "allow_loopback": True}),
            )
        ),
        metadata=b.server,
    )
    template = await deliveries.CreateTemplate(
        M.CreateTemplateRequest(
            template=template_pb2.Template(
                display_name=canary,
                description=canary,
                channel=channel_pb2.CHANNEL_WEBHOOK,
                content=template_pb2.MessageContent(
                    webhook=template_pb2.WebhookContent(
                        method="POST",
                        url=f"{sink.url}/{canary}",
                        body='{"c": "' + canary + '", "n": "{{ user.first_name }}"}',
                    )
                ),
            )
        ),
        metadata=b.server,
    )
    spec: Any = {
        "options": [{"channel": channel_pb2.CHANNEL_WEBHOOK, "template_id": template.template_id}],
        "data": struct({"c": canary}),
    }
    sent = await deliveries.Send(
        M.SendRequest(users=[by_id(user_id)], spec=spec, idempotency_key=f"k-{canary}"),
        metadata=b.server,
    )
    broadcast = await deliveries.Broadcast(
        M.BroadcastRequest(
            broadcast=broadcast_pb2.Broadcast(
                display_name=canary,
                audience=broadcast_pb2.Audience(
                    users=broadcast_pb2.Audience.UserList(refs=[by_id(user_id)])
                ),
                spec=spec,
            )
        ),
        metadata=b.server,
    )
    created = await journeys.CreateJourney(
        M.CreateJourneyRequest(
            journey=jpb.Journey(
                display_name=canary,
                description=canary,
                definition=definition(
                    node(
                        "hold",
                        delay=jpb.DelayNode(duration=seconds(3600)),
                        next={"next": "end"},
                    ),
                    exit_node("end"),
                ),
            )
        ),
        metadata=b.server,
    )
    await journeys.ActivateJourney(
        M.ActivateJourneyRequest(journey_id=created.journey_id), metadata=b.server
    )
    await journeys.AddCustomers(
        M.AddCustomersRequest(journey_id=created.journey_id, customers=[by_id(user_id)]),
        metadata=b.server,
    )

    async def message_id() -> str:
        listed = await deliveries.ListMessages(
            M.ListMessagesRequest(user=by_id(user_id)), metadata=b.server
        )
        return next((m.message_id for m in listed.messages), "")

    async def in_journey() -> bool:
        try:
            await journeys.GetCustomerState(
                M.GetCustomerStateRequest(journey_id=created.journey_id, customer=by_id(user_id)),
                metadata=b.server,
            )
        except Exception:
            return False
        return True

    first_message = sent.results[0].message_id or await eventually(message_id)
    await eventually(in_journey, what="B's customer in B's journey")
    await asyncio.sleep(0)
    return World(
        app=b,
        canary=canary,
        user_id=user_id,
        external_id=external_id,
        subscription_id=subscription.subscription_id,
        field_name=field_name,
        segment_id=segment.segment_id,
        import_id=job.import_id,
        template_id=template.template_id,
        message_id=first_message,
        broadcast_id=broadcast.broadcast_id,
        journey_id=created.journey_id,
    )
