"""``python -m services.cli.import_users`` as a subprocess against a real identity process."""

from __future__ import annotations

import asyncio
import csv
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tidings.identity.v1 import segment_pb2
from tidings.identity.v1 import subscription_pb2 as spb
from tidings.identity.v1.identity_service_pb2 import ListUsersRequest

from tests.e2e.processes import PYTHON, ROOT, ServiceProcess, ToolResult
from tests.identity.conftest import TestApp
from tests.identity.import_support import user
from tests.identity.support import new_id

if TYPE_CHECKING:
    from tidings.identity.v1.identity_service_pb2_grpc import IdentityServiceAsyncStub


async def _cli(
    service: ServiceProcess, key: str, *args: str, tty: bool = False, within: float = 60
) -> ToolResult:
    env = {name: value for name, value in os.environ.items() if not name.startswith("TIDINGS_")}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'gen'}", TIDINGS_API_KEY=key)
    leader = follower = -1
    if tty:
        leader, follower = os.openpty()
    process = await asyncio.create_subprocess_exec(
        str(PYTHON),
        "-m",
        "services.cli.import_users",
        "--server",
        service.grpc_target,
        *args,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=follower if tty else asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), within)
    if tty:
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(leader)
        stderr = b"".join(chunks)
    assert process.returncode is not None
    return ToolResult(process.returncode, stdout.decode(), stderr.decode(errors="replace"))


async def test_the_cli_imports_a_file_and_writes_the_refused_rows(
    identity_process: ServiceProcess,
    identity_stub: IdentityServiceAsyncStub,
    app: TestApp,
    tmp_path: Path,
) -> None:
    ana, bo = new_id(), new_id()
    source = tmp_path / "customers.csv"
    source.write_text(
        "id;Email;plan;Joined;mobile\n"
        f"{ana};ana@example.com;gold;31/01/2024;+34600111222\n"
        f'{bo};b@example.com;=HYPERLINK("x");yesterday;\n'
        f"{new_id()};not-an-email;silver;01/02/2024;\n",
        encoding="utf-8",
    )
    refused = tmp_path / "refused.csv"
    name = f"CLI list {new_id()}"
    result = await _cli(
        identity_process,
        app.server_key,
        str(source),
        "--id-column",
        "id",
        "--delimiter",
        ";",
        "--column",
        "Email=email",
        "--attribute",
        "plan:string",
        "--attribute",
        "Joined=joined:date",
        "--date-format",
        "Joined=%d/%m/%Y",
        "--subscription",
        "mobile:sms",
        "--list-name",
        name,
        "--rejections",
        str(refused),
    )
    assert result.returncode == 0, result.stderr
    assert "SUCCEEDED" in result.stdout
    assert "rows 3: created 1, updated 0, unchanged 0, rejected 2" in result.stdout
    assert "1 rows have cells starting with" in result.stdout
    got = await user(identity_stub, app, ana)
    assert got.attributes["joined"].string_value == "2024-01-31"  # a date field
    assert [s.token for s in got.subscriptions] == ["+34600111222"]
    rows = list(csv.reader(io.StringIO(refused.read_text(encoding="utf-8"))))
    assert rows[0] == [
        "line",
        "column",
        "reason",
        "message",
        "id",
        "Email",
        "plan",
        "Joined",
        "mobile",
    ]
    assert [row[:3] for row in rows[1:]] == [
        ["3", "Joined", "INVALID_DATE"],
        ["4", "Email", "INVALID_EMAIL"],
    ]
    # The file's own formula-like cell is written defused.
    assert rows[1][4:] == [bo, "b@example.com", '\'=HYPERLINK("x")', "yesterday", ""]
    segment_id = result.stdout.split("list segment: ")[1].split()[0]
    segment = await identity_stub.GetSegment(
        segment_pb2.GetSegmentRequest(segment_id=segment_id), metadata=app.server
    )
    assert segment.display_name == name


async def test_the_cli_shows_progress_on_a_terminal(
    identity_process: ServiceProcess, app: TestApp, tmp_path: Path
) -> None:
    source = tmp_path / "many.csv"
    source.write_text(
        "id,first_name\n" + "".join(f"{new_id()},Ana\n" for _ in range(30_000)), encoding="utf-8"
    )
    result = await _cli(
        identity_process,
        app.server_key,
        str(source),
        "--id-column",
        "id",
        "--column",
        "first_name=first_name",
        "--chunk-size",
        "4096",
        tty=True,
    )
    assert result.returncode == 0, result.stderr
    assert "MB" in result.stderr
    assert "rows" in result.stderr
    assert "[#" in result.stderr
    assert "created 30,000" in result.stdout


async def test_the_cli_exits_1_when_the_import_fails(
    identity_process: ServiceProcess, app: TestApp, tmp_path: Path
) -> None:
    source = tmp_path / "broken.csv"
    source.write_text('id,first_name\n1,"' + "x" * 1_200_000 + "\n", encoding="utf-8")
    result = await _cli(
        identity_process,
        app.server_key,
        str(source),
        "--id-column",
        "id",
        "--column",
        "first_name=first_name",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED" in result.stdout
    assert "quoted field" in result.stdout


async def test_the_cli_exits_2_on_a_refused_request_naming_the_field(
    identity_process: ServiceProcess, app: TestApp, tmp_path: Path
) -> None:
    source = tmp_path / "x.csv"
    source.write_text("id,size\n1,42\n", encoding="utf-8")
    result = await _cli(
        identity_process,
        app.server_key,
        str(source),
        "--id-column",
        "id",
        "--column",
        "size=shoe_size",
    )
    assert result.returncode == 2
    assert "INVALID_ARGUMENT" in result.stderr
    assert "options.columns[0].standard_field" in result.stderr
    bad_flag = await _cli(
        identity_process, app.server_key, str(source), "--id-column", "id", "--attribute", "size"
    )
    assert bad_flag.returncode == 2
    assert "--attribute" in bad_flag.stderr
    no_key = await _cli(identity_process, "", str(source), "--id-column", "id")
    assert no_key.returncode == 2
    assert "server key" in no_key.stderr


async def test_the_cli_dry_run_prints_the_counts_and_writes_nothing(
    identity_process: ServiceProcess,
    identity_stub: IdentityServiceAsyncStub,
    app: TestApp,
    tmp_path: Path,
) -> None:
    ids = [new_id() for _ in range(3)]
    source = tmp_path / "preview.csv"
    source.write_text(
        "id,first_name\n" + "".join(f"{i},Name {n}\n" for n, i in enumerate(ids)), encoding="utf-8"
    )
    args = (str(source), "--id-column", "id", "--column", "first_name=first_name")
    preview = await _cli(identity_process, app.server_key, *args, "--dry-run")
    assert preview.returncode == 0, preview.stderr
    assert "SUCCEEDED (dry run: nothing was written)" in preview.stdout
    assert "created 3," in preview.stdout
    listed = await identity_stub.ListUsers(ListUsersRequest(page_size=100), metadata=app.server)
    assert not {u.external_id for u in listed.users} & set(ids)
    applied = await _cli(identity_process, app.server_key, *args)
    assert applied.returncode == 0, applied.stderr
    assert "dry run" not in applied.stdout
    assert "created 3," in applied.stdout
    assert (await user(identity_stub, app, ids[2])).first_name == "Name 2"


async def test_the_readme_example_maps_one_email_column_to_the_profile_and_a_subscription(
    identity_process: ServiceProcess,
    identity_stub: IdentityServiceAsyncStub,
    app: TestApp,
    tmp_path: Path,
) -> None:
    customer = new_id()
    source = tmp_path / "customers.csv"
    source.write_text(
        f"customer_id,email,phone,plan\n{customer},Ana@Example.com,+34600111222,gold\n",
        encoding="utf-8",
    )
    # README.md's command, as written there.
    result = await _cli(
        identity_process,
        app.server_key,
        str(source),
        "--id-column",
        "customer_id",
        "--column",
        "email=email",
        "--column",
        "phone=phone",
        "--attribute",
        "plan:string",
        "--subscription",
        "email:email",
        "--list-name",
        f"Spring {new_id()}",
    )
    assert result.returncode == 0, result.stderr
    assert "SUCCEEDED" in result.stdout
    assert "rows 1: created 1, updated 0, unchanged 0, rejected 0" in result.stdout
    got = await user(identity_stub, app, customer)
    assert (got.email, got.phone, got.attributes["plan"].string_value) == (
        "Ana@example.com",
        "+34600111222",
        "gold",
    )
    assert [(s.type, s.token) for s in got.subscriptions] == [
        (spb.SUBSCRIPTION_TYPE_EMAIL, "ana@example.com")
    ]
