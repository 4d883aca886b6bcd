"""Helpers of the delivery tests: environment, users and subscriptions in identity, channels,
send options, waiting for a message's status, and a feed of ``delivery.receipts``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from aiokafka import AIOKafkaConsumer, TopicPartition
from google.protobuf import field_mask_pb2, struct_pb2
from tidings.delivery.v1 import (
    channel_pb2,
    message_pb2,
    template_pb2,
)
from tidings.delivery.v1 import (
    delivery_service_pb2 as dpb,
)
from tidings.events.v1.delivery_receipt_pb2 import DeliveryReceipt
from tidings.identity.v1 import identity_service_pb2 as ipb
from tidings.identity.v1 import subscription_pb2, user_pb2, user_ref_pb2

from services.runtime.kafka import DELIVERY_RECEIPTS
from tests.conftest import KAFKA_BOOTSTRAP
from tests.e2e.processes import free_port
from tests.identity.conftest import TestApp, bearer
from tests.polling import eventually
from tests.runtime.kafka_helpers import partitions_of

SIGNING_SECRET = "test-signing-secret-0123456789"
#: TIDINGS_DELIVERY_SECRET_KEY of the test delivery process (it signs tracking tokens).
TRACKING_SECRET = "test-delivery-secret"
S = message_pb2


def delivery_env(identity_target: str, **extra: str) -> tuple[dict[str, str], int]:
    """The environment of a test delivery process, and its tracking port."""
    port = free_port()
    env = {
        "TIDINGS_IDENTITY_TARGET": identity_target,
        "TIDINGS_TRACKING_HOST": "127.0.0.1",
        "TIDINGS_TRACKING_PORT": str(port),
        "TIDINGS_TRACKING_BASE_URL": f"http://127.0.0.1:{port}",
        "TIDINGS_RETRY_BASE_SECONDS": "0.2",
        "TIDINGS_RETRY_MAX_SECONDS": "1",
        "TIDINGS_SCHEDULER_INTERVAL_SECONDS": "0.2",
        "TIDINGS_DELIVERY_SECRET_KEY": TRACKING_SECRET,
    }
    env.update(extra)
    return env, port


def webhook(
    url: str, body: str = '{"hello": "{{ user.first_name | default: \'there\' }}"}'
) -> template_pb2.MessageContent:
    """Webhook content posting ``body`` to ``url``."""
    return template_pb2.MessageContent(
        webhook=template_pb2.WebhookContent(method="POST", url=url, body=body)
    )


def inline(channel: int, content: template_pb2.MessageContent) -> message_pb2.MessageSpec:
    """A spec with one inline option."""
    return message_pb2.MessageSpec(
        options=[message_pb2.SendOption(channel=channel, content=content)]  # type: ignore[arg-type]
    )


def by_id(user_id: str) -> user_ref_pb2.UserRef:
    return user_ref_pb2.UserRef(user_id=user_id)


def ext(external_id: str) -> user_ref_pb2.UserRef:
    return user_ref_pb2.UserRef(external_id=external_id)


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out


@dataclass
class DeliveryHarness:
    """Stubs and helpers bound to one test's app."""

    app: TestApp
    identity: Any
    delivery: Any
    tracking_port: int
    database_url: str

    @property
    def server(self) -> tuple[tuple[str, str], ...]:
        return self.app.server

    @property
    def client(self) -> tuple[tuple[str, str], ...]:
        return self.app.client

    async def user(self, **fields: Any) -> user_pb2.User:
        """A new user in identity (external id random), with the given standard fields."""
        external_id = f"u-{uuid.uuid4().hex[:12]}"
        attributes = fields.pop("attributes", {})
        user = user_pb2.User(**fields)
        for name, value in attributes.items():
            if isinstance(value, str):
                user.attributes[name].string_value = value
            elif isinstance(value, bool):
                user.attributes[name].bool_value = value
            else:
                user.attributes[name].number_value = value
        response = await self.identity.UpsertUser(
            ipb.UpsertUserRequest(ref=ext(external_id), user=user), metadata=self.server
        )
        return response.user  # type: ignore[no-any-return]

    async def subscribe(
        self,
        user_id: str,
        kind: int,
        token: str,
        *,
        opted_in: bool = True,
    ) -> subscription_pb2.Subscription:
        """A subscription of ``user_id``."""
        subscription = subscription_pb2.Subscription(
            type=kind,  # type: ignore[arg-type]
            token=token,
            opt_in=subscription_pb2.OPT_IN_STATE_SUBSCRIBED
            if opted_in
            else subscription_pb2.OPT_IN_STATE_UNSUBSCRIBED,
        )
        return await self.identity.CreateSubscription(  # type: ignore[no-any-return]
            ipb.CreateSubscriptionRequest(subscription=subscription, user=by_id(user_id)),
            metadata=self.server,
        )

    async def opt_out(self, subscription_id: str) -> None:
        await self.identity.UpdateSubscription(
            ipb.UpdateSubscriptionRequest(
                subscription=subscription_pb2.Subscription(
                    subscription_id=subscription_id,
                    opt_in=subscription_pb2.OPT_IN_STATE_UNSUBSCRIBED,
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["opt_in"]),
            ),
            metadata=self.server,
        )

    async def webhook_channel(self, **credentials: Any) -> channel_pb2.ChannelConfig:
        """Configure the webhook channel, loopback allowed (the sink is local)."""
        values: dict[str, Any] = {"signing_secret": SIGNING_SECRET, "allow_loopback": True}
        values.update(credentials)
        return await self.delivery.UpdateChannelConfig(  # type: ignore[no-any-return]
            dpb.UpdateChannelConfigRequest(
                channel_config=channel_pb2.ChannelConfig(
                    channel=channel_pb2.CHANNEL_WEBHOOK, credentials=struct(values)
                )
            ),
            metadata=self.server,
        )

    async def telegram_channel(self, endpoint: str) -> channel_pb2.ChannelConfig:
        """Configure Telegram against a local Bot API endpoint."""
        return await self.delivery.UpdateChannelConfig(  # type: ignore[no-any-return]
            dpb.UpdateChannelConfigRequest(
                channel_config=channel_pb2.ChannelConfig(
                    channel=channel_pb2.CHANNEL_TELEGRAM,
                    credentials=struct({"bot_token": "123456:test-token", "endpoint": endpoint}),
                    rate_limit_per_second=1000,
                )
            ),
            metadata=self.server,
        )

    async def send(
        self,
        users: Sequence[user_ref_pb2.UserRef],
        spec: message_pb2.MessageSpec,
        *,
        key: str = "",
        **fields: Any,
    ) -> dpb.SendResponse:
        return await self.delivery.Send(  # type: ignore[no-any-return]
            dpb.SendRequest(users=users, spec=spec, idempotency_key=key, **fields),
            metadata=self.server,
        )

    async def message(self, message_id: str) -> message_pb2.Message:
        return await self.delivery.GetMessage(  # type: ignore[no-any-return]
            dpb.GetMessageRequest(message_id=message_id), metadata=self.server
        )

    async def wait_status(
        self, message_id: str, *statuses: int, within: float = 30.0
    ) -> message_pb2.Message:
        """Poll GetMessage until the message reaches one of ``statuses``."""

        async def current() -> message_pb2.Message | None:
            try:
                return await self.message(message_id)
            except grpc.aio.AioRpcError as error:
                # A fan-out record's message exists once a worker has read it.
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                return None

        names = [S.MessageStatus.Name(s) for s in statuses]  # type: ignore[arg-type]
        message = await eventually(
            current,
            lambda found: found is not None and found.status in statuses,
            within=within,
            interval=0.1,
            what=f"message {message_id} in {names}",
        )
        assert message is not None
        return message


class ReceiptFeed:
    """The receipts put on ``delivery.receipts`` since the feed opened, of one app."""

    def __init__(self, app_id: str) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=KAFKA_BOOTSTRAP,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        self._app_id = app_id
        self.receipts: list[DeliveryReceipt] = []

    async def __aenter__(self) -> ReceiptFeed:
        await self._consumer.start()
        partitions = await partitions_of(KAFKA_BOOTSTRAP, DELIVERY_RECEIPTS.name)
        tps = [TopicPartition(DELIVERY_RECEIPTS.name, p) for p in partitions]
        self._consumer.assign(tps)
        for tp, offset in (await self._consumer.end_offsets(tps)).items():
            self._consumer.seek(tp, offset)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._consumer.stop()

    async def until(
        self, predicate: Callable[[list[DeliveryReceipt]], bool], within: float = 30.0
    ) -> list[DeliveryReceipt]:
        deadline = time.monotonic() + within
        while not predicate(self.receipts):
            if time.monotonic() > deadline:
                seen = [
                    (r.message_id, DeliveryReceipt.Status.Name(r.status)) for r in self.receipts
                ]
                raise TimeoutError(f"receipts condition not met; seen {seen}")
            batches = await self._consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    if record.value is None:
                        continue
                    receipt = DELIVERY_RECEIPTS.decode(record.value)
                    if receipt.app_id == self._app_id:
                        self.receipts.append(receipt)
        return self.receipts

    def of(self, message_id: str, status: int | None = None) -> list[DeliveryReceipt]:
        return [
            r
            for r in self.receipts
            if r.message_id == message_id and (status is None or r.status == status)
        ]


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


__all__ = [
    "SIGNING_SECRET",
    "TRACKING_SECRET",
    "DeliveryHarness",
    "ReceiptFeed",
    "bearer",
    "by_id",
    "code_of",
    "delivery_env",
    "ext",
    "inline",
    "struct",
    "webhook",
]
