"""The README's grpcurl session (scripts/demo.sh) runs against a real identity process."""

from __future__ import annotations

import asyncio
import json
import os
import re

from tests.e2e.processes import GRPCURL, ROOT, TEST_ADMIN_KEY, ServiceProcess


async def test_demo_session_runs_end_to_end(identity_process: ServiceProcess) -> None:
    env = {
        **os.environ,
        "IDENTITY": identity_process.grpc_target,
        "TIDINGS_ADMIN_KEY": TEST_ADMIN_KEY,
        "GRPCURL": str(GRPCURL),
    }
    process = await asyncio.create_subprocess_exec(
        "bash",
        str(ROOT / "scripts" / "demo.sh"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    transcript = stderr.decode()
    assert process.returncode == 0, transcript

    # The last answer is GetUser by alias: the logged-in profile with its alias, the device
    # that the client key registered and logged in, and the tracked event counted (or about to
    # be: events are stored by identity's consumer, a few milliseconds behind).
    answers = re.findall(r"^\{$.*?^\}$", transcript, flags=re.S | re.M)
    profile = json.loads(answers[-1])
    assert profile["external_id"] == "crm-42"
    assert profile["aliases"] == [{"label": "crm_id", "value": "A-0042"}]
    assert profile["attributes"] == {"plan": {"string_value": "gold"}}
    [device] = profile["subscriptions"]
    assert device["type"] == "SUBSCRIPTION_TYPE_IOS_PUSH"
    assert device["user_id"] == profile["user_id"]
    assert "IdentityService/Login" in transcript
    assert "IdentityService/TrackEvents" in transcript
