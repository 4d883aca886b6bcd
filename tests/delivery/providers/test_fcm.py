"""FcmAdapter against a local OAuth2 token endpoint and FCM HTTP v1 server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from services.delivery.providers.base import (
    Channel,
    CredentialsError,
    OutboundMessage,
    Outcome,
    PushContent,
)
from services.delivery.providers.fcm import FcmAdapter
from tests.delivery.providers.fakes.fcm import FakeFcm, ServiceAccount, make_service_account
from tests.delivery.providers.support import outbound


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def account() -> ServiceAccount:
    return make_service_account()


@pytest.fixture
async def fake(account: ServiceAccount) -> AsyncIterator[FakeFcm]:
    async with FakeFcm(account) as server:
        yield server


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def adapter(clock: Clock) -> AsyncIterator[FcmAdapter]:
    adapter = FcmAdapter(timeout=2, clock=clock)
    yield adapter
    await adapter.close()


def creds(fake: FakeFcm) -> dict[str, Any]:
    return {**fake.account.json(fake.token_uri), "endpoint": fake.url}


def push(token: str = "fcm-token-1", **content: Any) -> OutboundMessage:
    values = {"title": "Sale", "body": "50% off today", **content}
    return outbound(Channel.ANDROID_PUSH, token, PushContent(**values), ttl_seconds=3600)


async def test_exchanges_a_signed_assertion_then_sends(
    fake: FakeFcm, adapter: FcmAdapter, account: ServiceAccount
) -> None:
    message = push(
        image_url="https://cdn.example/i.png",
        deep_link="app://sale",
        data={"sku": "A1"},
        badge=3,
        sound="ping",
    )

    result = await adapter.send(message, creds(fake))

    assert result.outcome is Outcome.SENT
    assert result.provider_message_id.startswith(f"projects/{account.project_id}/messages/")
    [claims] = fake.assertions  # verified with the account's public key by the fake
    assert claims["iss"] == account.client_email
    assert claims["aud"] == fake.token_uri
    assert claims["exp"] - claims["iat"] == 3600
    [sent] = fake.sent
    assert sent["token"] == "fcm-token-1"
    assert sent["notification"] == {
        "title": "Sale",
        "body": "50% off today",
        "image": "https://cdn.example/i.png",
    }
    assert sent["data"] == {
        "sku": "A1",
        "tidings_message_id": message.message_id,
        "tidings_deep_link": "app://sale",
    }
    assert sent["android"] == {
        "priority": "high",
        "ttl": "3600s",
        "notification": {"sound": "ping", "notification_count": 3},
    }


async def test_a_data_only_push_has_no_notification(fake: FakeFcm, adapter: FcmAdapter) -> None:
    message = outbound(Channel.ANDROID_PUSH, "fcm-token-1", PushContent(data={"sync": "1"}))

    assert (await adapter.send(message, creds(fake))).outcome is Outcome.SENT

    [sent] = fake.sent
    assert "notification" not in sent
    assert sent["android"] == {"priority": "normal"}


async def test_the_access_token_is_cached_until_shortly_before_it_expires(
    fake: FakeFcm, adapter: FcmAdapter, clock: Clock
) -> None:
    clock.now -= 3500  # the fake checks iat against the real clock: start in the past
    for _ in range(3):
        assert (await adapter.send(push(), creds(fake))).outcome is Outcome.SENT
    assert len(fake.assertions) == 1

    clock.now += 3599 - 299  # inside the five-minute margin
    assert (await adapter.send(push(), creds(fake))).outcome is Outcome.SENT
    assert len(fake.assertions) == 2


async def test_concurrent_sends_share_one_token_exchange(
    fake: FakeFcm, adapter: FcmAdapter
) -> None:
    results = await asyncio.gather(*(adapter.send(push(f"t{i}"), creds(fake)) for i in range(20)))

    assert {r.outcome for r in results} == {Outcome.SENT}
    assert len(fake.assertions) == 1


async def test_a_revoked_access_token_is_replaced_and_the_send_made_once_more(
    fake: FakeFcm, adapter: FcmAdapter
) -> None:
    await adapter.send(push(), creds(fake))
    fake.revoke_access_tokens()

    result = await adapter.send(push("fcm-token-2"), creds(fake))

    assert result.outcome is Outcome.SENT
    assert len(fake.assertions) == 2
    assert [m["token"] for m in fake.sent] == ["fcm-token-1", "fcm-token-2"]


async def test_a_401_that_survives_a_new_access_token_is_retried_later(
    fake: FakeFcm, adapter: FcmAdapter
) -> None:
    fake.refuse_access_tokens = True

    result = await adapter.send(push(), creds(fake))

    assert (result.outcome, result.detail) == (Outcome.RETRY, "fcm:UNAUTHENTICATED")
    assert len(fake.assertions) == 2  # one refresh, not a loop
    assert len([r for r in fake.received if r.path.endswith("messages:send")]) == 2


async def test_a_token_endpoint_outage_is_retried(fake: FakeFcm, adapter: FcmAdapter) -> None:
    fake.token_endpoint_down = True

    result = await adapter.send(push(), creds(fake))

    assert (result.outcome, result.retry_after) == (Outcome.RETRY, 5.0)
    assert fake.sent == []


async def test_unregistered_token_fails_and_is_marked_dead(
    fake: FakeFcm, adapter: FcmAdapter
) -> None:
    fake.token_errors["gone"] = "UNREGISTERED"

    result = await adapter.send(push("gone"), creds(fake))

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, True)
    assert result.detail == "fcm:UNREGISTERED: Requested entity was not found."


async def test_an_invalid_token_fails_and_is_marked_dead(
    fake: FakeFcm, adapter: FcmAdapter
) -> None:
    fake.token_errors["garbage"] = "INVALID_TOKEN"

    result = await adapter.send(push("garbage"), creds(fake))

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, True)
    assert result.detail.startswith("fcm:INVALID_ARGUMENT: The registration token")


async def test_an_invalid_argument_elsewhere_does_not_blame_the_token(
    fake: FakeFcm, adapter: FcmAdapter
) -> None:
    result = await adapter.send(push(data={"blob": "x" * 5000}), creds(fake))

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, False)
    assert result.detail == "fcm:INVALID_ARGUMENT: Android message is too big"


async def test_sender_id_mismatch_fails_without_blaming_the_token(
    fake: FakeFcm, adapter: FcmAdapter
) -> None:
    fake.token_errors["other-project"] = "SENDER_ID_MISMATCH"

    result = await adapter.send(push("other-project"), creds(fake))

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, False)


@pytest.mark.parametrize(("failure", "status"), [("QUOTA_EXCEEDED", 429), ("UNAVAILABLE", 503)])
async def test_quota_and_unavailability_retry_after_what_fcm_says(
    fake: FakeFcm, adapter: FcmAdapter, failure: str, status: int
) -> None:
    fake.token_errors["busy"] = failure
    fake.retry_after = "42"

    result = await adapter.send(push("busy"), creds(fake))

    assert result.outcome is Outcome.RETRY
    assert result.retry_after == 42
    assert result.detail.startswith(f"fcm:{failure}")


async def test_a_service_account_of_another_project_cannot_get_a_token(
    fake: FakeFcm, adapter: FcmAdapter
) -> None:
    impostor = make_service_account()
    credentials = {
        **impostor.json(fake.token_uri),
        "client_email": fake.account.client_email,
        "private_key_id": fake.account.private_key_id,
        "endpoint": fake.url,
    }

    result = await adapter.send(push(), credentials)

    assert result.outcome is Outcome.FAILED
    assert result.detail == "fcm:oauth2 invalid_grant: Invalid JWT Signature."
    assert fake.sent == []


async def test_the_whole_key_file_is_accepted_as_one_field(
    fake: FakeFcm, adapter: FcmAdapter
) -> None:
    credentials = {
        "service_account": json.dumps(fake.account.json(fake.token_uri)),
        "endpoint": fake.url,
    }
    adapter.check_credentials(credentials)

    assert (await adapter.send(push(), credentials)).outcome is Outcome.SENT


def ec_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            {"private_key": "-----BEGIN PRIVATE KEY-----\nxyz\n-----END PRIVATE KEY-----"},
            "private_key",
        ),
        ({"private_key": ec_pem()}, "private_key"),
        ({"client_email": ""}, "client_email"),
        ({"project_id": None}, "project_id"),
        ({"project_id": "a/b"}, "project_id"),
        ({"token_uri": "not a url"}, "token_uri"),
        ({"type": "authorized_user"}, "type"),
    ],
)
def test_credentials_are_checked(
    account: ServiceAccount, change: dict[str, Any], field: str
) -> None:
    credentials = {**account.json("https://oauth2.googleapis.com/token"), **change}

    with pytest.raises(CredentialsError, match=f"^{field}:"):
        FcmAdapter().check_credentials(credentials)


def test_a_key_file_that_is_not_json_is_named() -> None:
    with pytest.raises(CredentialsError, match=r"^service_account:"):
        FcmAdapter().check_credentials({"service_account": "{not json"})
