"""Outgoing webhooks (delivery's webhook channel and journey's webhook node): signatures and SSRF.

Signatures: the documented scheme (services/runtime/webhooks.py, docs/delivery.md) is
``X-Tidings-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``. The
vectors below were computed with ``openssl dgst -sha256 -hmac``, not with our code; a receiver
written from the documentation (:func:`receiver_accepts`) accepts what delivery really sends and
refuses a tampered body, another secret and a stale timestamp.

SSRF: every non-public target (loopback, private, link-local, cloud metadata, IPv6-mapped IPv4,
decimal/hex/octal IPv4 spellings, a host name resolving to loopback, the unspecified address)
is refused. Where the address is this machine's, a listening socket on every interface records
each accepted connection and must record none: refused *before* connecting. Where it is not
(10/8, 169.254.169.254...), the refusal must be the guard's answer, never a connection error
or a timeout (which would mean a connection was attempted). A redirect to such an address is
never followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import socket
import time
import uuid
from pathlib import Path

import grpc
import grpc.aio
import pytest
from tidings.delivery.v1 import channel_pb2, message_pb2
from tidings.journey.v1 import journey_pb2 as jpb

from services.runtime.webhooks import SIGNATURE_HEADER, sign, verify_signature
from tests.abuse.conftest import Stack
from tests.abuse.rpc import M
from tests.conftest import temporary_database
from tests.delivery.sink import Sink
from tests.delivery.support import DeliveryHarness, by_id, inline, webhook
from tests.e2e.processes import free_port
from tests.identity.conftest import TestApp
from tests.journey.support import (
    create_active,
    definition,
    exit_node,
    journey_process,
    journey_stub,
    node,
    seconds,
)
from tests.polling import eventually

# (secret, timestamp, body, hex HMAC) — from `printf '%s' "<t>.<body>" | openssl dgst -sha256
# -hmac <secret>`.
VECTORS = [
    (
        "whsec_test_0123456789abcdef",
        1700000000,
        b'{"event":"sent","n":1}',
        "51f09aacfc80533cf8465f14a6e422614915ff9ae4473a66abd80e32f0fbf2be",
    ),
    (
        "whsec_test_0123456789abcdef",
        1700000000,
        b"",
        "814e706027d44b6013448b27b12c76ad281f72d11fcf05d71e1ef85b69465064",
    ),
    (
        "sécret-ünïcode-key-0001",
        1712345678,
        "héllo ✓".encode(),
        "644b28fcaf6a646b5bdcc91d5139b821f25a5198fda9c45d50f99fadb28d6771",
    ),
]


def receiver_accepts(secret: str, header: str, body: bytes, now: float) -> bool:
    """A receiver written from the documentation alone (not from our code)."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    if abs(now - int(fields["t"])) > 300:
        return False
    expected = hmac.new(secret.encode(), fields["t"].encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest(expected.hexdigest(), fields["v1"])


@pytest.mark.parametrize(("secret", "at", "body", "mac"), VECTORS)
def test_signature_matches_the_vectors(secret: str, at: int, body: bytes, mac: str) -> None:
    assert sign(secret, at, body) == f"t={at},v1={mac}"
    assert verify_signature(secret, f"t={at},v1={mac}", body, now=at + 299)
    assert receiver_accepts(secret, f"t={at},v1={mac}", body, now=at)


@pytest.mark.parametrize(("secret", "at", "body", "mac"), VECTORS)
def test_tampered_or_stale_signatures_fail(secret: str, at: int, body: bytes, mac: str) -> None:
    header = f"t={at},v1={mac}"
    assert not verify_signature(secret, header, body + b" ", now=at)
    assert not verify_signature(secret + "x", header, body, now=at)
    assert not verify_signature(secret, f"t={at + 1},v1={mac}", body, now=at)
    flipped = mac[:-1] + ("0" if mac[-1] != "0" else "1")
    assert not verify_signature(secret, f"t={at},v1={flipped}", body, now=at)
    assert not verify_signature(secret, f"t={at}", body, now=at)
    assert not verify_signature(secret, f"v1={mac}", body, now=at)
    assert not verify_signature(secret, header, body, now=at + 301)  # stale: a replay
    assert not verify_signature(secret, header, body, now=at - 301)  # from the future


@pytest.fixture
def harness(stack: Stack, app: TestApp) -> DeliveryHarness:
    return DeliveryHarness(app, stack.users, stack.deliveries, 0, stack.delivery_db)


async def test_delivery_signs_what_it_sends(harness: DeliveryHarness) -> None:
    secret = f"abuse-{uuid.uuid4().hex}"
    async with Sink() as sink:
        await harness.webhook_channel(signing_secret=secret)
        user = await harness.user(first_name="Zoë")
        sent = await harness.send(
            [by_id(user.user_id)], inline(channel_pb2.CHANNEL_WEBHOOK, webhook(sink.url))
        )
        await harness.wait_status(sent.results[0].message_id, message_pb2.MESSAGE_STATUS_SENT)
        [request] = sink.received
    header = request.headers[SIGNATURE_HEADER.lower()]
    assert receiver_accepts(secret, header, request.body, now=time.time())
    assert json.loads(request.body) == {"hello": "Zoë"}
    assert not receiver_accepts(secret, header, request.body + b"x", now=time.time())
    assert not receiver_accepts("another-secret-0123456", header, request.body, now=time.time())
    assert not receiver_accepts(secret, header, request.body, now=time.time() + 600)


# --- SSRF ------------------------------------------------------------------------------------


class Recorder:
    """Listens on every interface (IPv4 and IPv6) on one port; counts accepted connections."""

    def __init__(self) -> None:
        self.port = free_port()
        self.accepted: list[str] = []
        self._server: asyncio.Server | None = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted.append(str(writer.get_extra_info("peername")))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def __aenter__(self) -> Recorder:
        self._server = await asyncio.start_server(self._accept, host=None, port=self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


def _local_name() -> str:
    """A host name other than ``localhost`` that this machine resolves to a loopback address."""
    for name in (socket.gethostname(), "vm", "runsc", "ip6-localhost", "localhost."):
        with contextlib.suppress(OSError):
            infos = socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)
            if infos and all(str(i[4][0]).startswith(("127.", "::1")) for i in infos):
                return name
    return "localhost."


def reachable_targets(port: int) -> list[str]:
    """URLs that reach this machine's listener on ``port`` if a connection were made."""
    hosts = [
        "127.0.0.1",
        "127.0.0.2",
        "localhost",
        _local_name(),
        "[::1]",
        "[::ffff:127.0.0.1]",  # IPv6-mapped IPv4
        "[::ffff:7f00:1]",  # the same, in hex
        "2130706433",  # 127.0.0.1 as a decimal number
        "0x7f000001",  # hex
        "0177.0.0.1",  # octal
        "0x7f.1",  # mixed, short form
        "127.1",
        "0.0.0.0",  # the unspecified address connects to this host
    ]
    with contextlib.suppress(OSError):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.connect(("192.0.2.1", 9))  # no packet is sent: only picks the interface
        own = probe.getsockname()[0]
        probe.close()
        if not own.startswith("127."):
            hosts.append(own)  # this machine's own non-loopback address
    return [f"http://{host}:{port}/hook" for host in hosts]


#: Targets that are not this machine: the guard must answer, not the network.
REMOTE_TARGETS = [
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://[::ffff:a9fe:a9fe]/",
    "http://2852039166/",  # 169.254.169.254 as a decimal number
    "http://0xa9fea9fe/",
    "http://169.254.170.2/v2/credentials",  # ECS task metadata
    "http://100.100.100.200/latest/meta-data/",  # Alibaba metadata
    "http://[fd00:ec2::254]/",  # EC2 IPv6 metadata
    "http://[fe80::1]/",
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.0.1/",
    "http://100.64.0.1/",  # carrier-grade NAT
    "http://[fc00::1]/",
    "http://224.0.0.1/",  # multicast
]


async def _delivery_outcomes(harness: DeliveryHarness, urls: list[str]) -> dict[str, str]:
    """Per URL: how delivery answered (Send refused it, or the message's final state)."""
    user = await harness.user()
    ids, outcomes = {}, {}
    for url in urls:
        try:
            sent = await harness.send(
                [by_id(user.user_id)], inline(channel_pb2.CHANNEL_WEBHOOK, webhook(url))
            )
        except grpc.aio.AioRpcError as error:  # refused at the door: no connection either
            outcomes[url] = f"{error.code().name}: {error.details()}"
            continue
        ids[url] = sent.results[0].message_id
    for url, mid in ids.items():
        message = await harness.wait_status(
            mid, message_pb2.MESSAGE_STATUS_FAILED, message_pb2.MESSAGE_STATUS_SENT, within=40
        )
        outcomes[url] = f"{message_pb2.MessageStatus.Name(message.status)}: " + " | ".join(
            f"{c.reason} {c.detail}" for c in message.timeline
        )
    return outcomes


async def test_delivery_refuses_non_public_targets_before_connecting(
    harness: DeliveryHarness,
) -> None:
    await harness.webhook_channel(allow_loopback=False)
    async with Recorder() as recorder:
        urls = reachable_targets(recorder.port) + REMOTE_TARGETS
        outcomes = await _delivery_outcomes(harness, urls)
        await asyncio.sleep(0.5)
        assert recorder.accepted == []
    wrong = {
        url: outcome
        for url, outcome in outcomes.items()
        if not (outcome.startswith("MESSAGE_STATUS_FAILED") and "refused" in outcome)
        and not outcome.startswith("INVALID_ARGUMENT")
    }
    assert not wrong, "not refused by the guard:\n" + "\n".join(
        f"{u}: {d}" for u, d in wrong.items()
    )


async def test_delivery_never_follows_a_redirect(harness: DeliveryHarness) -> None:
    # The first hop is allowed (loopback, as an app may allow for a local receiver); the
    # redirect's target is this machine's recorder and the metadata address.
    async with Recorder() as recorder:
        targets = [f"http://127.0.0.1:{recorder.port}/", "http://169.254.169.254/"]
        for target in targets:
            async with Sink(
                script=lambda _r, t=target: (302, {"Location": t}, b"")  # type: ignore[misc]
            ) as redirector:
                await harness.webhook_channel(allow_loopback=True)
                outcomes = await _delivery_outcomes(harness, [redirector.url + "/start"])
                [outcome] = outcomes.values()
                assert outcome.startswith("MESSAGE_STATUS_FAILED"), outcome
                assert "redirect" in outcome, outcome
                assert len(redirector.received) == 1
        await asyncio.sleep(0.5)
        assert recorder.accepted == []


@pytest.fixture
async def hook_journey(stack: Stack, app: TestApp) -> str:
    """An active journey calling ``{{ user.attributes.hook }}`` (checked when called)."""
    journey = await create_active(
        stack.journeys,
        app.server,
        definition(
            node(
                "hook",
                webhook=jpb.WebhookNode(
                    url="{{ user.attributes.hook }}",
                    body="{}",
                    secret="s" * 20,
                    timeout=seconds(5),
                ),
                next={"success": "end", "failure": "end"},
            ),
            exit_node("end"),
        ),
    )
    return str(journey.journey_id)


async def _journey_outputs(stack: Stack, app: TestApp, journey_id: str) -> dict[str, int]:
    stats = await stack.journeys.GetJourneyStats(
        M.GetJourneyStatsRequest(journey_id=journey_id), metadata=app.server
    )
    return {o.output: o.count for n in stats.nodes if n.node_id == "hook" for o in n.outputs}


async def test_journey_refuses_non_public_targets_before_connecting(
    stack: Stack, app: TestApp, hook_journey: str
) -> None:
    async with Recorder() as recorder:
        urls = reachable_targets(recorder.port) + REMOTE_TARGETS
        refs = []
        for url in urls:
            created = await stack.users.UpsertUser(
                M.UpsertUserRequest(
                    ref={"external_id": f"h-{uuid.uuid4().hex[:10]}"},
                    user={"attributes": {"hook": {"string_value": url}}},
                ),
                metadata=app.server,
            )
            refs.append(by_id(created.user.user_id))
        await stack.journeys.AddCustomers(
            M.AddCustomersRequest(journey_id=hook_journey, customers=refs), metadata=app.server
        )

        async def all_called() -> dict[str, int] | None:
            outputs = await _journey_outputs(stack, app, hook_journey)
            return outputs if sum(outputs.values()) >= len(urls) else None

        outputs = await eventually(all_called, within=60, what="every webhook step")
        await asyncio.sleep(0.5)
        assert recorder.accepted == []
    # Failure, quickly: the guard refused (a connection attempt to 10.0.0.1 would time out).
    assert outputs == {"failure": len(urls)}
    log = stack.journey.log_text()
    assert log.count("refused") >= len(urls)


async def test_journey_refuses_literal_non_public_urls_at_validation(
    stack: Stack, app: TestApp
) -> None:
    refused = []
    for url in [
        "http://127.0.0.1/",
        "http://169.254.169.254/",
        "http://[::ffff:127.0.0.1]/",
        "http://10.1.2.3/",
        "http://localhost/",
        "http://[::1]/",
    ]:
        created = await stack.journeys.CreateJourney(
            M.CreateJourneyRequest(
                journey=jpb.Journey(
                    display_name="ssrf",
                    definition=definition(
                        node(
                            "hook",
                            webhook=jpb.WebhookNode(url=url),
                            next={"success": "end", "failure": "end"},
                        ),
                        exit_node("end"),
                    ),
                )
            ),
            metadata=app.server,
        )
        validated = await stack.journeys.ValidateJourney(
            M.ValidateJourneyRequest(journey_id=created.journey_id), metadata=app.server
        )
        if "WEBHOOK_URL_REFUSED" in str(validated):
            refused.append(url)
    assert len(refused) == 6, refused


async def test_journey_never_follows_a_redirect(stack: Stack, app: TestApp, tmp_path: Path) -> None:
    # A journey process that may call loopback (as a local demo would), so the first hop to the
    # local redirector is made; the redirect to the recorder must not be.
    async with (
        temporary_database() as dsn,
        journey_process(stack.identity, dsn, tmp_path, webhook_allow_private="true") as journey,
        grpc.aio.insecure_channel(journey.grpc_target) as channel,
        Recorder() as recorder,
    ):
        journeys = journey_stub(channel)
        target = f"http://127.0.0.1:{recorder.port}/"
        async with Sink(script=lambda _r: (302, {"Location": target}, b"")) as redirector:
            created = await create_active(
                journeys,
                app.server,
                definition(
                    node(
                        "hook",
                        webhook=jpb.WebhookNode(url=f"{redirector.url}/start", body="{}"),
                        next={"success": "end", "failure": "end"},
                    ),
                    exit_node("end"),
                ),
            )
            user = await stack.users.UpsertUser(
                M.UpsertUserRequest(ref={"external_id": f"r-{uuid.uuid4().hex[:10]}"}),
                metadata=app.server,
            )
            await journeys.AddCustomers(
                M.AddCustomersRequest(
                    journey_id=created.journey_id, customers=[by_id(user.user.user_id)]
                ),
                metadata=app.server,
            )

            async def done() -> dict[str, int] | None:
                stats = await journeys.GetJourneyStats(
                    M.GetJourneyStatsRequest(journey_id=created.journey_id), metadata=app.server
                )
                outputs = {
                    o.output: o.count for n in stats.nodes if n.node_id == "hook" for o in n.outputs
                }
                return outputs or None

            outputs = await eventually(done, within=30, what="the webhook step")
            assert outputs == {"failure": 1}
            assert len(redirector.received) == 1
        await asyncio.sleep(0.5)
        assert recorder.accepted == []
