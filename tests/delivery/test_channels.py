"""Channel configuration: credentials checked by the adapter, encrypted at rest, never returned."""

from __future__ import annotations

import asyncpg
import grpc
from google.protobuf import field_mask_pb2
from tidings.delivery.v1 import channel_pb2
from tidings.delivery.v1 import delivery_service_pb2 as dpb

from tests.delivery.support import SIGNING_SECRET, DeliveryHarness, struct
from tests.identity.support import failure

WEBHOOK = channel_pb2.CHANNEL_WEBHOOK


async def test_credentials_are_stored_encrypted_and_never_returned(
    harness: DeliveryHarness,
) -> None:
    saved = await harness.webhook_channel()
    assert saved.provider == "webhook"
    assert list(saved.credential_fields) == ["allow_loopback", "signing_secret"]
    assert not saved.HasField("credentials")
    conn = await asyncpg.connect(harness.database_url)
    try:
        stored = await conn.fetchval(
            "SELECT credentials FROM channel_configs WHERE app_id = $1", harness.app.app_id
        )
    finally:
        await conn.close()
    assert SIGNING_SECRET.encode() not in stored
    assert b"signing_secret" not in stored
    listed = await harness.delivery.ListChannelConfigs(
        dpb.ListChannelConfigsRequest(), metadata=harness.server
    )
    assert [c.channel for c in listed.channel_configs] == [WEBHOOK]


async def test_adapter_refuses_bad_credentials_naming_the_field(harness: DeliveryHarness) -> None:
    failed = await failure(
        harness.delivery.UpdateChannelConfig(
            dpb.UpdateChannelConfigRequest(
                channel_config=channel_pb2.ChannelConfig(
                    channel=WEBHOOK, credentials=struct({"signing_secret": "short"})
                )
            ),
            metadata=harness.server,
        )
    )
    assert failed.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.fields == ["channel_config.credentials"]


async def test_a_new_channel_needs_credentials_and_a_real_channel(harness: DeliveryHarness) -> None:
    failed = await failure(
        harness.delivery.UpdateChannelConfig(
            dpb.UpdateChannelConfigRequest(
                channel_config=channel_pb2.ChannelConfig(channel=WEBHOOK, disabled=True),
                update_mask=field_mask_pb2.FieldMask(paths=["disabled"]),
            ),
            metadata=harness.server,
        )
    )
    assert failed.fields == ["channel_config.credentials"]
    for channel in (channel_pb2.CHANNEL_UNSPECIFIED, channel_pb2.CHANNEL_PUSH):
        failed = await failure(
            harness.delivery.UpdateChannelConfig(
                dpb.UpdateChannelConfigRequest(
                    channel_config=channel_pb2.ChannelConfig(channel=channel)
                ),
                metadata=harness.server,
            )
        )
        assert failed.fields == ["channel_config.channel"]


async def test_partial_update_keeps_credentials(harness: DeliveryHarness) -> None:
    await harness.webhook_channel()
    updated = await harness.delivery.UpdateChannelConfig(
        dpb.UpdateChannelConfigRequest(
            channel_config=channel_pb2.ChannelConfig(
                channel=WEBHOOK, disabled=True, rate_limit_per_second=50
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["disabled", "rate_limit_per_second"]),
        ),
        metadata=harness.server,
    )
    assert (updated.disabled, updated.rate_limit_per_second) == (True, 50)
    assert "signing_secret" in updated.credential_fields


async def test_get_and_delete(harness: DeliveryHarness) -> None:
    failed = await failure(
        harness.delivery.GetChannelConfig(
            dpb.GetChannelConfigRequest(channel=WEBHOOK), metadata=harness.server
        )
    )
    assert (failed.code, failed.reason) == (grpc.StatusCode.NOT_FOUND, "CHANNEL_NOT_CONFIGURED")
    await harness.webhook_channel()
    got = await harness.delivery.GetChannelConfig(
        dpb.GetChannelConfigRequest(channel=WEBHOOK), metadata=harness.server
    )
    assert got.channel == WEBHOOK
    await harness.delivery.DeleteChannelConfig(
        dpb.DeleteChannelConfigRequest(channel=WEBHOOK), metadata=harness.server
    )
    failed = await failure(
        harness.delivery.DeleteChannelConfig(
            dpb.DeleteChannelConfigRequest(channel=WEBHOOK), metadata=harness.server
        )
    )
    assert failed.code == grpc.StatusCode.NOT_FOUND
