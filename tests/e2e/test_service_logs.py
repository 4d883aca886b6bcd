"""A failed test reports the errors its service processes logged while it ran."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import service_logs

pytest_plugins = ["pytester"]


def _record(level: str, msg: str, **fields: str) -> str:
    return json.dumps({"ts": "t", "level": level, "logger": "svc", "msg": msg, **fields}) + "\n"


def test_only_errors_written_since_the_offsets_are_reported(tmp_path: Path) -> None:
    old, new = tmp_path / "identity-1.log", tmp_path / "journey-2.log"
    old.write_text(_record("ERROR", "before the test"))
    service_logs.watch(old)
    offsets = service_logs.log_offsets()
    with old.open("a") as log:
        log.write(_record("INFO", "fine"))
        log.write(_record("ERROR", "rpc failed", exc="Traceback (most recent call last):\nBoom"))
    new.write_text(_record("CRITICAL", "gave up") + "Traceback (most recent call last):\n")
    service_logs.watch(new)  # started during the test: read from its start
    assert service_logs.errors_since(offsets) == [
        "identity-1.log t svc: rpc failed",
        "Traceback (most recent call last):",
        "Boom",
        "journey-2.log t svc: gave up",
        "journey-2.log: Traceback (most recent call last):",
    ]


def test_a_failed_test_shows_the_service_errors(pytester: pytest.Pytester) -> None:
    log = pytester.path / "delivery-3.log"
    pytester.makeconftest(
        f"""
from pathlib import Path
pytest_plugins = ["tests.service_logs"]
from tests import service_logs
service_logs.watch(Path({str(log)!r}))
"""
    )
    pytester.makepyfile(
        f"""
from pathlib import Path
RECORD = {_record("ERROR", "worker crashed")!r}

def test_fails():
    Path({str(log)!r}).write_text(RECORD)
    assert False

def test_passes():
    Path({str(log)!r}).write_text(RECORD * 2)
"""
    )
    result = pytester.runpytest(
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*service errors (call)*", "delivery-3.log t svc: worker crashed"])
    # Only the failed test's errors: the passing one's two are not shown.
    assert result.stdout.str().count("worker crashed") == 1
