"""The session of docs/delivery.md, with the real grpcurl: a channel configured, a template
created and previewed, a message sent once by idempotency key and traced."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from tests.delivery.sink import Sink
from tests.delivery.support import DeliveryHarness
from tests.e2e.processes import ServiceProcess, grpcurl


async def _call(target: str, key: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
    result = await grpcurl(
        "-H",
        f"authorization: Bearer {key}",
        "-d",
        json.dumps(body),
        target,
        f"tidings.delivery.v1.DeliveryService/{method}",
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if result.stdout.strip() else {}


async def test_the_documented_session(
    harness: DeliveryHarness, sink: Sink, delivery_service: tuple[ServiceProcess, int]
) -> None:
    target, key = delivery_service[0].grpc_target, harness.app.server_key
    user = await harness.user(first_name="Ana")
    config = await _call(
        target,
        key,
        "UpdateChannelConfig",
        {
            "channel_config": {
                "channel": "CHANNEL_WEBHOOK",
                "credentials": {"signing_secret": "whsec-0123456789abcdef", "allow_loopback": True},
            }
        },
    )
    assert config["provider"] == "webhook"
    assert config["credential_fields"] == ["allow_loopback", "signing_secret"]
    body = (
        '{"text": "Hi {{ user.first_name | default: \'there\' }}, order {{ data.order }} shipped"}'
    )
    template = await _call(
        target,
        key,
        "CreateTemplate",
        {
            "template": {
                "display_name": "order shipped",
                "channel": "CHANNEL_WEBHOOK",
                "content": {"webhook": {"url": f"{sink.url}/hook", "body": body}},
            }
        },
    )
    assert template["version"] == 1
    preview = await _call(
        target,
        key,
        "RenderPreview",
        {
            "user": {"external_id": user.external_id},
            "option": {"template_id": template["template_id"]},
            "spec": {"data": {"order": "A-1001"}},
        },
    )
    assert json.loads(preview["content"]["webhook"]["body"]) == {
        "text": "Hi Ana, order A-1001 shipped"
    }
    send = {
        "users": [{"external_id": user.external_id}],
        "idempotency_key": "order-A-1001-shipped",
        "spec": {
            "options": [{"template_id": template["template_id"]}],
            "data": {"order": "A-1001"},
        },
    }
    first = await _call(target, key, "Send", send)
    again = await _call(target, key, "Send", send)
    assert again["replayed"] is True
    assert again["results"] == first["results"]
    message_id = first["results"][0]["message_id"]
    deadline = time.monotonic() + 30
    while True:
        message = await _call(target, key, "GetMessage", {"message_id": message_id})
        if message["status"] == "MESSAGE_STATUS_SENT":
            break
        assert time.monotonic() < deadline, message
        await asyncio.sleep(0.2)
    assert [c["status"] for c in message["timeline"]] == [
        "MESSAGE_STATUS_QUEUED",
        "MESSAGE_STATUS_SENT",
    ]
    assert message["timeline"][-1]["detail"] == "webhook:HTTP 200"
    listed = await _call(target, key, "ListMessages", {"user": {"external_id": user.external_id}})
    assert [m["message_id"] for m in listed["messages"]] == [message_id]
    assert sink.count == 1
