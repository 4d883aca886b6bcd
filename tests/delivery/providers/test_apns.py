"""ApnsAdapter against a local APNs: HTTP/2 over TLS, JWTs verified with the key's public half."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from services.delivery.providers.apns import ApnsAdapter, apns_id_for
from services.delivery.providers.base import (
    Channel,
    CredentialsError,
    OutboundMessage,
    Outcome,
    PushContent,
)
from tests.delivery.providers.fakes.apns import FakeApns
from tests.delivery.providers.fakes.tls import TlsFiles, make_self_signed
from tests.delivery.providers.support import closed_port, outbound

TEAM = "ABCDE12345"
KEY_ID = "KEY0000001"
BUNDLE = "com.acme.shop"
SIGNING_KEY = ec.generate_private_key(ec.SECP256R1())


def pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_self_signed(Path(tmp_path_factory.mktemp("apns-tls")))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def fake(tls: TlsFiles, clock: Clock) -> AsyncIterator[FakeApns]:
    async with FakeApns(tls, now=clock) as server:
        server.register_key(KEY_ID, TEAM, SIGNING_KEY.public_key(), BUNDLE)
        yield server


@pytest.fixture
async def adapter(tls: TlsFiles, clock: Clock) -> AsyncIterator[ApnsAdapter]:
    adapter = ApnsAdapter(timeout=5, verify=tls.client_context(), clock=clock)
    yield adapter
    await adapter.close()


def creds(fake: FakeApns, **extra: Any) -> dict[str, Any]:
    base = {
        "team_id": TEAM,
        "key_id": KEY_ID,
        "private_key": pem(SIGNING_KEY),
        "bundle_id": BUNDLE,
        "endpoint": fake.url,
    }
    return base | extra


def device() -> str:
    return secrets.token_hex(32)


def push(
    token: str | None = None, key: str | None = None, ttl: int | None = None, **content: Any
) -> OutboundMessage:
    values = {"title": "Order shipped", "body": "It arrives Tuesday", **content}
    return outbound(
        Channel.IOS_PUSH, token or device(), PushContent(**values), key=key, ttl_seconds=ttl
    )


async def test_sends_over_http2_with_a_verified_jwt_and_apples_headers(
    fake: FakeApns, adapter: ApnsAdapter, clock: Clock
) -> None:
    message = push(
        key="journey-9:node-1:visit-1",
        ttl=3600,
        badge=4,
        sound="default",
        image_url="https://cdn.acme.example/box.jpg",
        deep_link="acme://orders/42",
        data={"order": "42", "aps": "ignored"},
    )

    result = await adapter.send(message, creds(fake))

    assert result.outcome is Outcome.SENT
    [accepted] = fake.accepted
    assert accepted.http_version == "2"
    assert accepted.device_token == message.recipient.address
    assert accepted.jwt_claims["iss"] == TEAM  # signature checked with the public key
    headers = accepted.headers
    assert headers["apns-topic"] == BUNDLE
    assert headers["apns-push-type"] == "alert"
    assert headers["apns-priority"] == "10"
    assert headers["apns-expiration"] == str(int(clock.now) + 3600)
    assert headers["apns-id"] == apns_id_for("journey-9:node-1:visit-1")
    assert headers["apns-collapse-id"] == hashlib.sha256(b"journey-9:node-1:visit-1").hexdigest()
    assert result.provider_message_id == headers["apns-id"]
    assert accepted.payload == {
        "aps": {
            "alert": {"title": "Order shipped", "body": "It arrives Tuesday"},
            "sound": "default",
            "mutable-content": 1,
            "badge": 4,
        },
        "order": "42",
        "tidings": {
            "message_id": message.message_id,
            "deep_link": "acme://orders/42",
            "image_url": "https://cdn.acme.example/box.jpg",
        },
    }


async def test_concurrent_sends_share_one_http2_connection_and_one_jwt(
    fake: FakeApns, adapter: ApnsAdapter
) -> None:
    results = await asyncio.gather(*(adapter.send(push(), creds(fake)) for _ in range(50)))

    assert {r.outcome for r in results} == {Outcome.SENT}
    assert len(fake.accepted) == 50
    assert {r.peer for r in fake.received} == {fake.received[0].peer}  # streams, one connection
    assert len(fake.tokens_seen) == 1


async def test_the_same_idempotency_key_gives_the_same_apns_id(
    fake: FakeApns, adapter: ApnsAdapter
) -> None:
    token = device()
    for key in ("k-1", "k-1", "k-2"):
        assert (await adapter.send(push(token, key=key), creds(fake))).outcome is Outcome.SENT

    ids = [n.headers["apns-id"] for n in fake.accepted]
    assert ids[0] == ids[1] != ids[2]


async def test_a_data_only_push_is_a_background_push(fake: FakeApns, adapter: ApnsAdapter) -> None:
    result = await adapter.send(push(title="", body="", data={"sync": "1"}, ttl=0), creds(fake))

    assert result.outcome is Outcome.SENT
    [accepted] = fake.accepted
    assert accepted.headers["apns-push-type"] == "background"
    assert accepted.headers["apns-priority"] == "5"
    assert accepted.headers["apns-expiration"] == "0"
    assert accepted.payload["aps"] == {"content-available": 1}
    assert accepted.payload["sync"] == "1"


async def test_the_jwt_is_reused_then_replaced_after_fifty_minutes(
    fake: FakeApns, adapter: ApnsAdapter, clock: Clock
) -> None:
    for _ in range(3):
        assert (await adapter.send(push(), creds(fake))).outcome is Outcome.SENT
    assert len(fake.tokens_seen) == 1

    clock.now += 49 * 60
    assert (await adapter.send(push(), creds(fake))).outcome is Outcome.SENT
    assert len(fake.tokens_seen) == 1

    clock.now += 2 * 60
    assert (await adapter.send(push(), creds(fake))).outcome is Outcome.SENT
    assert len(fake.tokens_seen) == 2  # and APNs did not find it too soon


async def test_an_expired_provider_token_is_replaced_and_retried(
    fake: FakeApns, adapter: ApnsAdapter, clock: Clock
) -> None:
    await adapter.send(push(), creds(fake))
    clock.now += 25 * 60
    fake.now = lambda: clock.now + 40 * 60  # APNs' clock runs ahead: the JWT is 65 min old

    result = await adapter.send(push(), creds(fake))
    again = await adapter.send(push(), creds(fake))

    assert (result.outcome, result.detail) == (Outcome.RETRY, "apns:ExpiredProviderToken")
    assert again.outcome is Outcome.SENT
    assert len(fake.tokens_seen) == 2


async def test_a_young_token_is_not_replaced_even_if_apns_calls_it_expired(
    fake: FakeApns, adapter: ApnsAdapter, clock: Clock
) -> None:
    fake.now = lambda: clock.now + 2 * 3600

    results = [await adapter.send(push(), creds(fake)) for _ in range(2)]

    assert [r.outcome for r in results] == [Outcome.RETRY, Outcome.RETRY]
    first, second = (r.headers["authorization"] for r in fake.received)
    assert first == second  # a new one now would be TooManyProviderTokenUpdates


async def test_an_unregistered_token_fails_and_is_marked_dead(
    fake: FakeApns, adapter: ApnsAdapter
) -> None:
    token = device()
    fake.unregistered.add(token)

    result = await adapter.send(push(token), creds(fake))

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, True)
    assert result.detail == "apns:Unregistered"


async def test_a_bad_device_token_fails_and_is_marked_dead(
    fake: FakeApns, adapter: ApnsAdapter
) -> None:
    result = await adapter.send(push("ab" * 50), creds(fake))  # hex, but not a token APNs knows

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, True)
    assert result.detail == "apns:BadDeviceToken"
    assert len(fake.received) == 1


async def test_a_token_that_is_not_hex_is_dead_without_a_call(
    fake: FakeApns, adapter: ApnsAdapter
) -> None:
    result = await adapter.send(push("../../3/device/x"), creds(fake))

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, True)
    assert fake.received == []


@pytest.mark.parametrize(
    ("status", "reason"),
    [(429, "TooManyRequests"), (500, "InternalServerError"), (503, "ServiceUnavailable")],
)
async def test_throttling_and_server_errors_are_retried(
    fake: FakeApns, adapter: ApnsAdapter, status: int, reason: str
) -> None:
    token = device()
    fake.answers[token] = (status, reason)

    result = await adapter.send(push(token), creds(fake))

    assert (result.outcome, result.token_invalid) == (Outcome.RETRY, False)
    assert result.detail == f"apns:{reason}"


async def test_a_topic_of_another_team_fails_without_blaming_the_token(
    fake: FakeApns, adapter: ApnsAdapter
) -> None:
    result = await adapter.send(push(), creds(fake, bundle_id="com.other.app"))

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, False)
    assert result.detail == "apns:TopicDisallowed"


async def test_a_jwt_signed_by_another_key_is_refused(fake: FakeApns, adapter: ApnsAdapter) -> None:
    impostor = pem(ec.generate_private_key(ec.SECP256R1()))

    result = await adapter.send(push(), creds(fake, private_key=impostor))

    assert (result.outcome, result.detail) == (Outcome.FAILED, "apns:InvalidProviderToken")


async def test_a_payload_over_4_kb_is_not_sent(fake: FakeApns, adapter: ApnsAdapter) -> None:
    result = await adapter.send(push(body="x" * 4100), creds(fake))

    assert result.outcome is Outcome.FAILED
    assert result.detail.startswith("apns:PayloadTooLarge")
    assert fake.received == []


async def test_an_unreachable_apns_is_retried(adapter: ApnsAdapter) -> None:
    credentials = {
        "team_id": TEAM,
        "key_id": KEY_ID,
        "private_key": pem(SIGNING_KEY),
        "bundle_id": BUNDLE,
        "endpoint": f"https://localhost:{closed_port()}",
    }

    result = await adapter.send(push(), credentials)

    assert result.outcome is Outcome.RETRY


async def test_a_server_with_an_untrusted_certificate_is_not_trusted(
    fake: FakeApns,
) -> None:
    adapter = ApnsAdapter(timeout=5)  # the system's trust store does not know the test CA
    try:
        result = await adapter.send(push(), creds(fake))
    finally:
        await adapter.close()

    assert result.outcome is Outcome.RETRY
    assert fake.received == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"team_id": "short"}, "team_id"),
        ({"key_id": None}, "key_id"),
        ({"bundle_id": "noperiod"}, "bundle_id"),
        ({"environment": "staging"}, "environment"),
        ({"private_key": "not a pem"}, "private_key"),
        ({"private_key": pem(rsa.generate_private_key(65537, 2048))}, "private_key"),
        ({"private_key": pem(ec.generate_private_key(ec.SECP384R1()))}, "private_key"),
    ],
)
def test_credentials_are_checked(change: dict[str, Any], field: str) -> None:
    credentials = {
        "team_id": TEAM,
        "key_id": KEY_ID,
        "private_key": pem(SIGNING_KEY),
        "bundle_id": BUNDLE,
        "environment": "sandbox",
    } | change

    with pytest.raises(CredentialsError, match=f"^{field}:"):
        ApnsAdapter().check_credentials(credentials)


def test_the_rsa_key_error_names_ec() -> None:
    credentials = {
        "team_id": TEAM,
        "key_id": KEY_ID,
        "private_key": pem(rsa.generate_private_key(65537, 2048)),
        "bundle_id": BUNDLE,
    }

    with pytest.raises(CredentialsError, match="not a valid EC P-256"):
        ApnsAdapter().check_credentials(credentials)
