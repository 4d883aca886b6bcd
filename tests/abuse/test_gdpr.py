"""GDPR erasure in the middle of a journey, and what a database dump holds afterwards.

A customer with canary values in every profile field (external id, names, email, phone, alias,
attributes, an event, a subscription) is in a journey ``send → wait → send`` whose messages
carry their profile (a webhook to a local sink). After the first send reached the sink, the
customer is erased (identity ``DeleteUser``) while waiting. Then:

* no message for them reaches the sink after the erasure committed;
* ``pg_dump`` of identity's, journey's and delivery's databases (the binary next to the Postgres
  that scripts/stack.sh runs) contains none of the canary values; the value of a PII customer
  field is not in identity's dump even before the erasure (sealed at rest), though the message
  rendered it;
* the dumps show none of the provider credentials (delivery's channel configs) nor any API key
  secret in plaintext.
"""

from __future__ import annotations

import asyncio
import glob
import time
import uuid
from pathlib import Path
from typing import Any

from tidings.delivery.v1 import channel_pb2, template_pb2
from tidings.identity.v1 import customer_field_pb2
from tidings.identity.v1 import subscription_pb2 as spb
from tidings.journey.v1 import journey_pb2 as jpb

from tests.abuse.conftest import Stack
from tests.abuse.rpc import M
from tests.abuse.world import make_canary
from tests.delivery.sink import Sink
from tests.delivery.support import by_id, struct
from tests.identity.conftest import TestApp
from tests.journey.support import (
    create_active,
    definition,
    exit_node,
    node,
    seconds,
    send,
)
from tests.polling import eventually

#: The wait between the two sends: long enough for the erasure to happen inside it.
WAIT_SECONDS = 8.0


def pg_dump_binary() -> str:
    """``pg_dump`` of the newest Postgres under /usr/lib/postgresql (what stack.sh runs)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_dump"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    assert found, "no pg_dump next to the Postgres binaries"
    return found[-1]


async def pg_dump(dsn: str) -> bytes:
    """A plain-SQL dump (schema and data) of the database at ``dsn``."""
    process = await asyncio.create_subprocess_exec(
        pg_dump_binary(),
        "--no-owner",
        "--format=plain",
        f"--dbname={dsn}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    assert b"CREATE TABLE" in out
    return out


async def _channels(stack: Stack, app: TestApp, sink: Sink, secrets: dict[str, str]) -> None:
    configs: list[tuple[Any, dict[str, Any]]] = [
        (
            channel_pb2.CHANNEL_WEBHOOK,
            {"signing_secret": secrets["signing"], "allow_loopback": True},
        ),
        (
            channel_pb2.CHANNEL_TELEGRAM,
            {"bot_token": secrets["bot"], "endpoint": sink.url},
        ),
        (
            channel_pb2.CHANNEL_SMS,
            {
                "account_sid": "AC" + "0" * 32,
                "auth_token": secrets["twilio"],
                "from_number": "+14155550100",
                "endpoint": sink.url,
            },
        ),
    ]
    for channel, credentials in configs:
        await stack.deliveries.UpdateChannelConfig(
            M.UpdateChannelConfigRequest(
                channel_config=channel_pb2.ChannelConfig(
                    channel=channel, credentials=struct(credentials)
                )
            ),
            metadata=app.server,
        )


async def test_erasure_mid_journey_stops_sends_and_leaves_no_trace(
    stack: Stack, app: TestApp
) -> None:
    canary = make_canary()
    profile = {
        "external_id": f"ext-{canary}",
        "first_name": f"first{canary}",
        "last_name": f"last{canary}",
        "email": f"mail{canary}@example.com",
        "alias": f"alias{canary}",
        "attribute": f"attr{canary}",
        "event": f"event{canary}",
        "token": f"sub{canary}@example.org",
    }
    secrets = {
        "signing": f"signing-{uuid.uuid4().hex}",
        "bot": f"123456:{uuid.uuid4().hex}",
        "twilio": f"twilio{uuid.uuid4().hex}",
    }
    async with Sink() as sink:
        await _channels(stack, app, sink, secrets)
        template = await stack.deliveries.CreateTemplate(
            M.CreateTemplateRequest(
                template=template_pb2.Template(
                    display_name="erasure",
                    channel=channel_pb2.CHANNEL_WEBHOOK,
                    content=template_pb2.MessageContent(
                        webhook=template_pb2.WebhookContent(
                            method="POST",
                            url=f"{sink.url}/hook",
                            body=(
                                '{"name": "{{ user.first_name }} {{ user.last_name }}", '
                                '"email": "{{ user.email }}", '
                                '"attr": "{{ user.attributes.secret }}"}'
                            ),
                        )
                    ),
                )
            ),
            metadata=app.server,
        )
        journey = await create_active(
            stack.journeys,
            app.server,
            definition(
                send("first", template.template_id, ("webhook",), next="wait"),
                # A wait for an event that never comes: its timeout is the pause.
                node(
                    "wait",
                    wait_for_event=jpb.WaitForEventNode(
                        event=jpb.Entry.CustomEvent(name="never_happens"),
                        timeout=seconds(WAIT_SECONDS),
                    ),
                    next={"event": "second", "timeout": "second"},
                ),
                send("second", template.template_id, ("webhook",), next="end"),
                exit_node("end"),
            ),
        )
        # A PII customer field: sealed at rest, yet rendered into the message (delivery reads
        # the profile through BatchGetUsers, which opens it).
        await stack.users.CreateCustomerField(
            M.CreateCustomerFieldRequest(
                field=customer_field_pb2.CustomerField(
                    name="secret", type=customer_field_pb2.FIELD_TYPE_STRING, pii=True
                )
            ),
            metadata=app.server,
        )
        upserted = await stack.users.UpsertUser(
            M.UpsertUserRequest(
                ref={"external_id": profile["external_id"]},
                user={
                    "first_name": profile["first_name"],
                    "last_name": profile["last_name"],
                    "email": profile["email"],
                    "attributes": {"secret": {"string_value": profile["attribute"]}},
                },
            ),
            metadata=app.server,
        )
        user_id = upserted.user.user_id
        await stack.users.AddAlias(
            M.AddAliasRequest(
                ref={"user_id": user_id}, alias={"label": "crm", "value": profile["alias"]}
            ),
            metadata=app.server,
        )
        await stack.users.CreateSubscription(
            M.CreateSubscriptionRequest(
                subscription=spb.Subscription(
                    type=spb.SUBSCRIPTION_TYPE_EMAIL,
                    token=profile["token"],
                    opt_in=spb.OPT_IN_STATE_SUBSCRIBED,
                ),
                user=by_id(user_id),
            ),
            metadata=app.server,
        )
        await stack.users.TrackEvents(
            M.TrackEventsRequest(
                events=[
                    M.TrackedEventInput(
                        user=by_id(user_id),
                        name="purchase",
                        properties=struct({"note": profile["event"]}),
                    )
                ]
            ),
            metadata=app.server,
        )
        await stack.journeys.AddCustomers(
            M.AddCustomersRequest(journey_id=journey.journey_id, customers=[by_id(user_id)]),
            metadata=app.server,
        )

        async def first_arrived() -> bool:
            return any(profile["first_name"].encode() in r.body for r in sink.received)

        await eventually(first_arrived, within=30, what="the first send at the sink")
        assert any(profile["attribute"].encode() in r.body for r in sink.received)
        # Control: before the erasure the dump does show the profile (the grep below can fail).
        before = (await pg_dump(stack.identity_db)).lower()
        assert profile["first_name"].encode() in before
        assert profile["event"].encode() in before
        # ... but not the value of the PII field, encrypted at rest.
        assert profile["attribute"].lower().encode() not in before
        # Erase while the customer waits between the two sends.
        await stack.users.DeleteUser(M.DeleteUserRequest(ref=by_id(user_id)), metadata=app.server)
        erased_at = time.time()
        arrived_before = len(sink.received)

        async def journey_forgot() -> bool:
            states = await stack.journeys.ListCustomerStates(
                M.ListCustomerStatesRequest(journey_id=journey.journey_id), metadata=app.server
            )
            return not states.states

        # The second send would be due WAIT_SECONDS after the first: wait past it.
        await asyncio.sleep(max(0.0, WAIT_SECONDS + 4 - (time.time() - erased_at)))
        late = [r for r in sink.received[arrived_before:] if r.time >= erased_at]
        assert late == [], f"{len(late)} message(s) reached the sink after the erasure"
        assert len(sink.received) == 1, [r.body for r in sink.received]
        await eventually(journey_forgot, within=30, what="journey dropping the erased customer")

        async def delivery_forgot() -> bool:
            return user_id.encode() not in await pg_dump(stack.delivery_db)

        # Delivery erases the user's messages (their opaque id included) on user.deleted.
        await eventually(delivery_forgot, within=30, what="delivery erasing the user's messages")

    dumps = {
        name: await pg_dump(dsn)
        for name, dsn in (
            ("identity", stack.identity_db),
            ("journey", stack.journey_db),
            ("delivery", stack.delivery_db),
        )
    }
    traces = {
        f"{service}: {what}": dump.lower().count(value.lower().encode())
        for service, dump in dumps.items()
        for what, value in [*profile.items(), ("canary", canary)]
        if value.lower().encode() in dump.lower()
    }
    assert not traces, f"the erased profile left traces in the dumps: {traces}"
    plaintext = {
        f"{service}: {what}": True
        for service, dump in dumps.items()
        for what, value in [
            *secrets.items(),
            ("server key", app.server_key),
            ("client key", app.client_key),
        ]
        if value.encode() in dump
    }
    assert not plaintext, f"credentials in plaintext at rest: {sorted(plaintext)}"
