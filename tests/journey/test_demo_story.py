"""`make dev`'s journey demo (scripts/demo_story.sh) runs against real identity, delivery and
journey processes, and the statistics it prints are what its provider sinks received."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path

from tests.conftest import temporary_database
from tests.delivery.support import delivery_env
from tests.e2e.processes import GRPCURL, ROOT, TEST_ADMIN_KEY, ServiceProcess, running_service
from tests.journey.support import journey_process

CUSTOMERS = 4
CLICKERS = 2


def _table(transcript: str) -> dict[str, dict[str, object]]:
    """The printed statistics table: node -> entered, sent, delivered, clicked, outputs."""
    table = transcript.split("Journey statistics\n", 1)[1]
    rows: dict[str, dict[str, object]] = {}
    for line in table.splitlines()[2:]:
        match = re.match(r"^  (\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*(.*)$", line)
        if match is None:
            break
        node, entered, sent, delivered, clicked, outputs = match.groups()
        rows[node] = {
            "entered": int(entered),
            "sent": int(sent),
            "delivered": int(delivered),
            "clicked": int(clicked),
            "outputs": dict(o.split("=") for o in outputs.split(", ") if o),
        }
    return rows


async def test_demo_story_prints_statistics_matching_the_sinks(
    identity_service: ServiceProcess, tmp_path: Path
) -> None:
    env, _ = delivery_env(identity_service.grpc_target)
    async with (
        temporary_database() as delivery_dsn,
        temporary_database() as journey_dsn,
        running_service("delivery", database_url=delivery_dsn, log_dir=tmp_path, env=env) as d,
    ):
        await d.wait_serving()
        async with journey_process(
            identity_service, journey_dsn, tmp_path, delivery_target=d.grpc_target
        ) as j:
            process = await asyncio.create_subprocess_exec(
                "bash",
                str(ROOT / "scripts" / "demo_story.sh"),
                env={
                    **os.environ,
                    "IDENTITY": identity_service.grpc_target,
                    "DELIVERY": d.grpc_target,
                    "JOURNEY": j.grpc_target,
                    "TIDINGS_ADMIN_KEY": TEST_ADMIN_KEY,
                    "GRPCURL": str(GRPCURL),
                    # Room for the clicks to be reported on a loaded machine (make dev: 20 s).
                    "DEMO_CLICK_WAIT_SECONDS": "30",
                },
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its sinks and calls die with it
            )
            try:
                _, stderr = await asyncio.wait_for(process.communicate(), 300)
            finally:
                if process.returncode is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    await process.wait()
    transcript = stderr.decode()
    (tmp_path / "transcript.txt").write_text(transcript)
    assert process.returncode == 0, transcript

    # A tutorial: every step is a grpcurl call, printed.
    for method in (
        "DeliveryService/UpdateChannelConfig",
        "DeliveryService/CreateTemplate",
        "IdentityService/CreateSubscription",
        "JourneyService/CreateJourney",
        "JourneyService/ActivateJourney",
        "JourneyService/UploadCustomers",
        "DeliveryService/ReportEngagement",
        "JourneyService/GetJourneyStats",
    ):
        call = (
            r"^\$ grpcurl -plaintext -H \"authorization: Bearer [^\"]+\" -d '.*?' "
            r"127\.0\.0\.1:\d+ tidings\.\w+\.v1\." + re.escape(method) + "$"
        )
        assert re.search(call, transcript, flags=re.S | re.M), method

    # The last answer printed is GetJourneyStats; the table repeats it; the sinks agree.
    answers = re.findall(r"^\{$.*?^\}$", transcript, flags=re.S | re.M)
    stats = json.loads(answers[-1])
    nodes = {n["node_id"]: n for n in stats["nodes"]}
    assert int(stats["entered"]) == CUSTOMERS
    assert int(nodes["push"]["sent"]) == CUSTOMERS
    assert int(nodes["push"]["clicked"]) == CLICKERS
    assert int(nodes["email"]["sent"]) == CLICKERS
    assert int(nodes["sms"]["sent"]) == CUSTOMERS - CLICKERS

    table = _table(transcript)
    assert table["push"]["sent"] == CUSTOMERS
    assert table["push"]["clicked"] == CLICKERS
    assert table["clicked"]["outputs"] == {
        "event": str(CLICKERS),
        "timeout": str(CUSTOMERS - CLICKERS),
    }
    assert table["email"]["sent"] == CLICKERS
    assert table["sms"]["sent"] == CUSTOMERS - CLICKERS
    assert table["end"]["entered"] == CUSTOMERS

    received = re.search(r"^Received by the sinks: (.*)$", transcript, flags=re.M)
    assert received is not None
    sinks = {k: int(v) for k, v in (part.split(" ") for part in received[1].split(", "))}
    assert sinks == {
        "telegram": table["push"]["sent"],
        "email": table["email"]["sent"],
        "sms": table["sms"]["sent"],
    }
