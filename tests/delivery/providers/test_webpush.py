"""WebPushAdapter against a local push service that checks VAPID and decrypts the payload."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from services.delivery.providers.base import (
    Channel,
    CredentialsError,
    OutboundMessage,
    Outcome,
    PushContent,
)
from services.delivery.providers.webpush import (
    MAX_PAYLOAD,
    WebPushAdapter,
    b64url_decode,
    b64url_encode,
    encrypt_payload,
)
from tests.delivery.providers.fakes.webpush import FakePushService, Subscription, decrypt
from tests.delivery.providers.support import outbound

# RFC 8291 Appendix A: the example's keys, salt and resulting body.
RFC_PLAINTEXT = b"When I grow up, I want to be a watermelon"
RFC_AS_PRIVATE = "yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw"
RFC_UA_PRIVATE = "q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94"
RFC_UA_PUBLIC = (
    "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4"
)
RFC_AUTH = "BTBZMqHH6r4Tts7J_aSIgg"
RFC_SALT = "DGv6ra1nlYgDCS1FRnbzlw"
RFC_BODY = (
    "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27ml"
    "mlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPT"
    "pK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN"
)

VAPID_KEY = ec.generate_private_key(ec.SECP256R1())
VAPID_RAW = b64url_encode(VAPID_KEY.private_numbers().private_value.to_bytes(32, "big"))
VAPID_PUBLIC = b64url_encode(
    VAPID_KEY.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
)
CREDENTIALS = {
    "vapid_private_key": VAPID_RAW,
    "vapid_subject": "mailto:ops@acme.example",
    # The fake push service listens on loopback.
    "allow_loopback": True,
}
NO_LOOPBACK = {k: v for k, v in CREDENTIALS.items() if k != "allow_loopback"}


def key_from(raw: str) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(b64url_decode(raw), "big"), ec.SECP256R1())


def test_encryption_matches_the_rfc_8291_example() -> None:
    body = encrypt_payload(
        RFC_PLAINTEXT,
        b64url_decode(RFC_UA_PUBLIC),
        b64url_decode(RFC_AUTH),
        salt=b64url_decode(RFC_SALT),
        sender_key=key_from(RFC_AS_PRIVATE),
    )

    assert b64url_encode(body) == RFC_BODY


def test_the_fakes_decryption_opens_the_rfc_8291_example() -> None:
    plaintext = decrypt(b64url_decode(RFC_BODY), key_from(RFC_UA_PRIVATE), b64url_decode(RFC_AUTH))

    assert plaintext == RFC_PLAINTEXT


@pytest.fixture
async def fake() -> AsyncIterator[FakePushService]:
    async with FakePushService() as server:
        yield server


@pytest.fixture
async def adapter() -> AsyncIterator[WebPushAdapter]:
    adapter = WebPushAdapter(timeout=2, allow_insecure_endpoints=True)
    yield adapter
    await adapter.close()


def push(
    subscription: Subscription, ttl: int | None = 600, key: str | None = None, **content: Any
) -> OutboundMessage:
    values = {"title": "Back in stock", "body": "The red shoes are back", **content}
    return outbound(
        Channel.WEB_PUSH,
        subscription.endpoint,
        PushContent(**values),
        ttl_seconds=ttl,
        key=key,
        p256dh=subscription.p256dh,
        auth=subscription.auth_b64,
    )


async def test_the_push_service_decrypts_what_was_sent_and_accepts_the_vapid_jwt(
    fake: FakePushService, adapter: WebPushAdapter
) -> None:
    subscription = fake.subscribe(application_server_key=VAPID_PUBLIC)
    message = push(
        subscription,
        image_url="https://cdn.example/shoe.png",
        deep_link="https://shop.example/shoes",
        data={"sku": "R-42"},
        badge=2,
    )

    result = await adapter.send(message, CREDENTIALS)

    assert result.outcome is Outcome.SENT
    assert result.provider_message_id.startswith(f"{fake.url}/m/")
    [delivered] = subscription.delivered
    assert json.loads(delivered.plaintext) == {
        "message_id": message.message_id,
        "title": "Back in stock",
        "body": "The red shoes are back",
        "image": "https://cdn.example/shoe.png",
        "url": "https://shop.example/shoes",
        "badge": 2,
        "data": {"sku": "R-42"},
    }
    assert delivered.vapid_key == VAPID_PUBLIC
    assert delivered.vapid_claims["aud"] == fake.url
    assert delivered.vapid_claims["sub"] == "mailto:ops@acme.example"
    assert time.time() < delivered.vapid_claims["exp"] <= time.time() + 24 * 3600
    assert delivered.headers["ttl"] == "600"
    assert delivered.headers["urgency"] == "high"
    assert delivered.headers["content-encoding"] == "aes128gcm"
    assert len(delivered.headers["topic"]) == 32


async def test_a_duplicate_of_one_send_carries_the_same_topic(
    fake: FakePushService, adapter: WebPushAdapter
) -> None:
    subscription = fake.subscribe()
    first = push(subscription, key="journey-7:node-3:visit-1")
    again = push(subscription, key="journey-7:node-3:visit-1")
    other = push(subscription, key="journey-7:node-3:visit-2")

    for message in (first, again, other):
        assert (await adapter.send(message, CREDENTIALS)).outcome is Outcome.SENT

    topics = [d.headers["topic"] for d in subscription.delivered]
    assert topics[0] == topics[1] != topics[2]


async def test_a_data_only_push_is_normal_urgency_with_the_default_ttl(
    fake: FakePushService, adapter: WebPushAdapter
) -> None:
    subscription = fake.subscribe()

    result = await adapter.send(push(subscription, ttl=None, title="", body=""), CREDENTIALS)

    assert result.outcome is Outcome.SENT
    [delivered] = subscription.delivered
    assert delivered.headers["urgency"] == "normal"
    assert delivered.headers["ttl"] == str(28 * 24 * 3600)


async def test_a_pem_key_signs_too(fake: FakePushService, adapter: WebPushAdapter) -> None:
    pem = VAPID_KEY.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
    subscription = fake.subscribe(application_server_key=VAPID_PUBLIC)
    credentials = {**CREDENTIALS, "vapid_private_key": pem, "vapid_public_key": VAPID_PUBLIC}

    assert (await adapter.send(push(subscription), credentials)).outcome is Outcome.SENT


@pytest.mark.parametrize("state", ["gone", "unknown"])
async def test_an_expired_subscription_fails_and_is_marked_dead(
    fake: FakePushService, adapter: WebPushAdapter, state: str
) -> None:
    subscription = fake.subscribe()
    if state == "gone":
        subscription.gone = True
    else:
        del fake.subscriptions[subscription.id]

    result = await adapter.send(push(subscription), CREDENTIALS)

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, True)
    assert result.detail.startswith("webpush:410 " if state == "gone" else "webpush:404 ")


async def test_a_subscription_made_for_another_vapid_key_fails_without_being_marked(
    fake: FakePushService, adapter: WebPushAdapter
) -> None:
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    subscription = fake.subscribe(
        application_server_key=b64url_encode(
            other.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        )
    )

    result = await adapter.send(push(subscription), CREDENTIALS)

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, False)
    assert result.detail.startswith("webpush:403 ")


async def test_payload_too_large_is_failed(fake: FakePushService, adapter: WebPushAdapter) -> None:
    subscription = fake.subscribe()
    subscription.answer = (413, {})

    result = await adapter.send(push(subscription), CREDENTIALS)

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, False)
    assert result.detail.startswith("webpush:413 ")


async def test_a_payload_over_the_limit_is_not_sent(
    fake: FakePushService, adapter: WebPushAdapter
) -> None:
    subscription = fake.subscribe()

    result = await adapter.send(push(subscription, body="x" * MAX_PAYLOAD), CREDENTIALS)

    assert result.outcome is Outcome.FAILED
    assert "payload too large" in result.detail
    assert fake.received == []


async def test_a_payload_at_the_limit_fits_the_4096_byte_body(
    fake: FakePushService, adapter: WebPushAdapter
) -> None:
    subscription = fake.subscribe()
    message = push(subscription, title="", body="")
    # Message ids all have the same length, so this one's JSON overhead is the next one's.
    overhead = len(
        json.dumps({"message_id": message.message_id, "body": ""}, separators=(",", ":"))
    )
    message = push(subscription, title="", body="y" * (MAX_PAYLOAD - overhead))

    result = await adapter.send(message, CREDENTIALS)

    assert result.outcome is Outcome.SENT
    assert len(fake.received[0].body) == 4096


async def test_rate_limiting_retries_after_an_http_date(
    fake: FakePushService, adapter: WebPushAdapter
) -> None:
    subscription = fake.subscribe()
    subscription.answer = (
        429,
        {"retry-after": email.utils.formatdate(time.time() + 120, usegmt=True)},
    )

    result = await adapter.send(push(subscription), CREDENTIALS)

    assert result.outcome is Outcome.RETRY
    assert result.retry_after is not None
    assert 110 <= result.retry_after <= 121


@pytest.mark.parametrize("status", [408, 425])
async def test_a_request_timeout_or_too_early_is_retried_after_retry_after(
    fake: FakePushService, adapter: WebPushAdapter, status: int
) -> None:
    subscription = fake.subscribe()
    subscription.answer = (status, {"retry-after": "30"})

    result = await adapter.send(push(subscription), CREDENTIALS)

    assert (result.outcome, result.retry_after) == (Outcome.RETRY, 30.0)
    assert result.detail.startswith(f"webpush:{status} ")


async def test_a_server_error_is_retried(fake: FakePushService, adapter: WebPushAdapter) -> None:
    subscription = fake.subscribe()
    subscription.answer = (503, {})

    result = await adapter.send(push(subscription), CREDENTIALS)

    assert (result.outcome, result.retry_after) == (Outcome.RETRY, None)


async def test_plain_http_endpoints_are_refused_by_default(fake: FakePushService) -> None:
    adapter = WebPushAdapter(timeout=2)
    try:
        result = await adapter.send(push(fake.subscribe()), CREDENTIALS)
    finally:
        await adapter.close()

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, True)
    assert fake.received == []


class Listener:
    """A local TCP server that counts the connections reaching it and closes them."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Listener:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _accept(self, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_an_https_endpoint_on_loopback_is_refused_unless_the_app_allows_it(
    fake: FakePushService, host: str
) -> None:
    # What a browser holding a client key can register: https, but pointing at our network.
    subscription = fake.subscribe()
    adapter = WebPushAdapter(timeout=2)
    try:
        async with Listener() as listener:
            message = outbound(
                Channel.WEB_PUSH,
                f"https://{host}:{listener.port}/push/{subscription.id}",
                PushContent(title="t"),
                p256dh=subscription.p256dh,
                auth=subscription.auth_b64,
            )
            result = await adapter.send(message, NO_LOOPBACK)
            assert listener.connections == 0
            # The control: allowed, the same endpoint is called (TLS then fails: a retry).
            allowed = await adapter.send(message, CREDENTIALS)
            assert listener.connections == 1
    finally:
        await adapter.close()

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, True)
    assert result.detail.startswith("webpush:subscription endpoint address refused: ")
    assert result.detail.endswith("is loopback")
    assert allowed.outcome is Outcome.RETRY


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://10.1.2.3/push/x",
        "https://192.168.0.10/push/x",
        "https://169.254.169.254/latest/meta-data/",
        "https://[fd00::1]/push/x",
        "https://[::ffff:127.0.0.1]/push/x",
        "https://[2002:7f00:1::]/push/x",
        "https://[64:ff9b::a00:1]/push/x",
        "https://[2001:0:4136:e378:8000:63bf:80ff:fffe]/push/x",
    ],
)
async def test_private_and_ipv4_carrying_endpoints_are_refused_before_any_call(
    fake: FakePushService, adapter: WebPushAdapter, endpoint: str
) -> None:
    subscription = fake.subscribe()
    message = outbound(
        Channel.WEB_PUSH,
        endpoint,
        PushContent(title="t"),
        p256dh=subscription.p256dh,
        auth=subscription.auth_b64,
    )

    result = await adapter.send(message, NO_LOOPBACK)

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, True)
    assert "address refused" in result.detail


@pytest.mark.parametrize(
    ("p256dh", "auth"),
    [
        ("BCVxsr7N_eNgVRqv", RFC_AUTH),  # truncated key
        (RFC_UA_PUBLIC, "c2hvcnQ"),  # auth not 16 bytes
        ("B" + "A" * 86, RFC_AUTH),  # 65 bytes, but not a point on the curve
        ("%%%", RFC_AUTH),
    ],
)
async def test_a_subscription_with_broken_keys_is_dead(
    fake: FakePushService, adapter: WebPushAdapter, p256dh: str, auth: str
) -> None:
    subscription = fake.subscribe()
    message = outbound(
        Channel.WEB_PUSH, subscription.endpoint, PushContent(title="t"), p256dh=p256dh, auth=auth
    )

    result = await adapter.send(message, CREDENTIALS)

    assert (result.outcome, result.token_invalid) == (Outcome.FAILED, True)
    assert fake.received == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"vapid_private_key": ""}, "vapid_private_key"),
        ({"vapid_private_key": "AAAA"}, "vapid_private_key"),
        (
            {"vapid_private_key": "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----"},
            "vapid_private_key",
        ),
        ({"vapid_public_key": RFC_UA_PUBLIC}, "vapid_public_key"),
        ({"vapid_subject": "ops@acme.example"}, "vapid_subject"),
        ({"vapid_subject": None}, "vapid_subject"),
        ({"allow_loopback": "yes"}, "allow_loopback"),
        ({"allow_private": 1}, "allow_private"),
    ],
)
def test_credentials_are_checked(change: dict[str, Any], field: str) -> None:
    with pytest.raises(CredentialsError, match=f"^{field}:"):
        WebPushAdapter().check_credentials({**CREDENTIALS, **change})
