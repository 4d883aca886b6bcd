"""The webhook adapter against a local HTTP endpoint: signature, headers, answers, SSRF guard."""

from __future__ import annotations

import ipaddress
import time
from typing import Any

import pytest

from services.delivery.providers.base import (
    Channel,
    CredentialsError,
    OutboundMessage,
    Outcome,
    Recipient,
    WebhookContent,
)
from services.delivery.providers.webhook import WebhookAdapter
from services.runtime.webhooks import AddressPolicy, address_refusal, verify_signature
from tests.delivery.sink import Sink, SinkRequest

SECRET = "s" * 32
LOOPBACK = {"signing_secret": SECRET, "allow_loopback": True, "timeout_seconds": 2}


def _message(url: str, body: str = '{"a": 1}', method: str = "POST") -> OutboundMessage:
    return OutboundMessage(
        message_id="m-1",
        idempotency_key="key-1",
        channel=Channel.WEBHOOK,
        recipient=Recipient(),
        content=WebhookContent(method=method, url=url, headers={"X-App": "yes"}, body=body),
    )


async def _send(url: str, credentials: dict[str, Any] | None = None) -> Any:
    adapter = WebhookAdapter()
    try:
        return await adapter.send(_message(url), credentials or LOOPBACK)
    finally:
        await adapter.close()


async def test_a_call_is_signed_and_carries_the_idempotency_key(sink: Sink) -> None:
    result = await _send(f"{sink.url}/in?x=1")
    assert result.outcome is Outcome.SENT
    [request] = sink.received
    assert (request.method, request.path, request.body) == ("POST", "/in?x=1", b'{"a": 1}')
    assert request.headers["idempotency-key"] == "key-1"
    assert request.headers["x-app"] == "yes"
    signature = request.headers["x-tidings-signature"]
    assert signature.startswith("t=")
    assert verify_signature(SECRET, signature, request.body, now=time.time())
    assert not verify_signature("other-secret-xxxxxxxx", signature, request.body, now=time.time())
    assert not verify_signature(SECRET, signature, b"tampered", now=time.time())
    assert not verify_signature(SECRET, signature, request.body, now=time.time() + 3600)


async def test_keep_alive_reuses_one_connection() -> None:
    async with Sink() as sink:
        adapter = WebhookAdapter()
        try:
            for _ in range(5):
                result = await adapter.send(_message(f"{sink.url}/x"), LOOPBACK)
                assert result.outcome is Outcome.SENT
        finally:
            await adapter.close()
    assert (sink.count, sink.connections) == (5, 1)


@pytest.mark.parametrize(
    ("status", "headers", "outcome", "retry_after"),
    [
        (204, {}, Outcome.SENT, None),
        (400, {}, Outcome.FAILED, None),
        (404, {}, Outcome.FAILED, None),
        (410, {}, Outcome.FAILED, None),
        (302, {"Location": "http://elsewhere/"}, Outcome.FAILED, None),
        (429, {"Retry-After": "7"}, Outcome.RETRY, 7.0),
        (408, {}, Outcome.RETRY, None),
        (500, {}, Outcome.RETRY, None),
        (503, {"Retry-After": "120"}, Outcome.RETRY, 120.0),
    ],
)
async def test_answers_are_classified(
    status: int, headers: dict[str, str], outcome: Outcome, retry_after: float | None
) -> None:
    def script(_: SinkRequest) -> tuple[int, dict[str, str], bytes]:
        return status, headers, b"{}"

    async with Sink(script=script) as sink:
        result = await _send(f"{sink.url}/x")
    assert result.outcome is outcome
    assert result.retry_after == retry_after
    assert f"HTTP {status}" in result.detail


async def test_a_timeout_is_retried_later() -> None:
    async with Sink(delay=5) as sink:
        started = time.monotonic()
        result = await _send(f"{sink.url}/slow", {**LOOPBACK, "timeout_seconds": 1})
    assert result.outcome is Outcome.RETRY
    assert "timeout" in result.detail
    # The request went out: the endpoint may have it (repeated with the same key).
    assert result.maybe_delivered
    assert time.monotonic() - started < 3


async def test_a_refused_connection_is_retried_later() -> None:
    from tests.e2e.processes import free_port

    result = await _send(f"http://127.0.0.1:{free_port()}/nobody")
    assert result.outcome is Outcome.RETRY
    assert not result.maybe_delivered  # nothing went out


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:1/x",
        "http://localhost:1/x",
        "http://[::1]:1/x",
        "http://10.0.0.5/x",
        "http://192.168.1.1/x",
        "http://172.16.0.1/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/x",
        "http://[::ffff:127.0.0.1]/x",
        "http://0.0.0.0/x",
    ],
)
async def test_private_loopback_link_local_and_metadata_addresses_are_refused(url: str) -> None:
    result = await _send(url, {"signing_secret": SECRET})
    assert result.outcome is Outcome.FAILED
    assert "address refused" in result.detail


def test_each_address_class_is_allowed_only_explicitly() -> None:
    loopback, private = ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.1.2.3")
    metadata = ipaddress.ip_address("169.254.169.254")
    assert address_refusal(loopback, AddressPolicy(allow_loopback=True)) is None
    assert address_refusal(private, AddressPolicy(allow_loopback=True)) is not None
    assert address_refusal(private, AddressPolicy(allow_private=True)) is None
    assert address_refusal(metadata, AddressPolicy(allow_private=True)) is not None
    assert address_refusal(metadata, AddressPolicy(allow_link_local=True)) is None
    assert address_refusal(ipaddress.ip_address("93.184.216.34"), AddressPolicy()) is None


@pytest.mark.parametrize(
    ("address", "leads_to"),
    [
        ("::ffff:127.0.0.1", "127.0.0.1 is loopback"),  # IPv4-mapped
        ("2002:7f00:1::", "127.0.0.1 is loopback"),  # 6to4
        ("2002:a00:1::1", "10.0.0.1 is private"),
        ("2002:a9fe:a9fe::", "169.254.169.254 is link-local or metadata"),
        ("64:ff9b::7f00:1", "127.0.0.1 is loopback"),  # NAT64
        ("64:ff9b::c0a8:101", "192.168.1.1 is private"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "127.0.0.1 is loopback"),  # Teredo client
    ],
)
def test_ipv6_forms_that_carry_a_refused_ipv4_address_are_refused(
    address: str, leads_to: str
) -> None:
    refusal = address_refusal(ipaddress.ip_address(address), AddressPolicy())
    assert refusal is not None
    assert refusal.endswith(leads_to)
    everything = AddressPolicy(allow_loopback=True, allow_private=True, allow_link_local=True)
    assert address_refusal(ipaddress.ip_address(address), everything) is None


def test_ipv6_forms_that_carry_a_public_ipv4_address_are_allowed() -> None:
    for address in ("2002:808:808::1", "64:ff9b::808:808"):
        assert address_refusal(ipaddress.ip_address(address), AddressPolicy()) is None


@pytest.mark.parametrize(
    "credentials",
    [
        {},
        {"signing_secret": "short"},
        {"signing_secret": SECRET, "timeout_seconds": 0},
        {"signing_secret": SECRET, "timeout_seconds": 99},
        {"signing_secret": SECRET, "allow_loopback": "yes"},
        {"signing_secret": SECRET, "unexpected": 1},
    ],
)
def test_bad_credentials_are_refused(credentials: dict[str, Any]) -> None:
    with pytest.raises(CredentialsError):
        WebhookAdapter().check_credentials(credentials)
