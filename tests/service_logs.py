"""The errors service processes logged while a test ran, shown with the test's failure.

A CI run keeps only its console output: the log files of the services a test started are
gone with the machine, so a failure that depends on what a service did (an INTERNAL answer,
a consumer that gave up) would leave nothing to read. ``tests/conftest.py`` remembers how far
each log had been written when a test started and, if the test fails, adds the ERROR and
CRITICAL lines (with their tracebacks) written since then to its report: the two hooks below,
which ``tests/conftest.py`` imports.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from pathlib import Path

import pluggy
import pytest

__all__ = [
    "errors_since",
    "log_offsets",
    "pytest_runtest_makereport",
    "pytest_runtest_setup",
    "watch",
]

_LOGS: set[Path] = set()

#: At most this many lines of service errors per failed test (the newest kept).
MAX_LINES = 80


def watch(log_path: Path) -> None:
    """Count ``log_path`` among the service logs whose errors a failed test reports."""
    _LOGS.add(log_path)


def log_offsets() -> dict[Path, int]:
    """How far each watched log has been written now."""
    return {path: _size(path) for path in _LOGS}


def errors_since(offsets: dict[Path, int]) -> list[str]:
    """The ERROR and CRITICAL records written since ``offsets`` (logs not in it: since their
    start), each as ``service logger: message`` and its traceback, oldest first."""
    lines: list[str] = []
    for path in sorted(_LOGS):
        try:
            with path.open("rb") as log:
                log.seek(offsets.get(path, 0))
                text = log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            continue
        for raw in text.splitlines():
            lines.extend(_error_lines(path, raw))
    return lines[-MAX_LINES:]


_OFFSETS = pytest.StashKey[dict[Path, int]]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Remember how far every service log had been written when the test started."""
    item.stash[_OFFSETS] = log_offsets()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    """A failed test's report gets a section with the service errors logged since it started."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and _OFFSETS in item.stash:
        errors = errors_since(item.stash[_OFFSETS])
        if errors:
            report.sections.append((f"service errors ({call.when})", "\n".join(errors)))


def _error_lines(path: Path, raw: str) -> list[str]:
    try:
        record = json.loads(raw)
    except ValueError:
        # Not a log record: what a dying interpreter printed, worth seeing next to the errors.
        return [f"{path.name}: {raw}"] if raw.startswith(("Traceback", "Fatal")) else []
    if not isinstance(record, dict) or record.get("level") not in ("ERROR", "CRITICAL"):
        return []
    head = f"{path.name} {record.get('ts', '')} {record.get('logger', '')}: {record.get('msg', '')}"
    exc = str(record.get("exc", ""))
    return [head, *exc.splitlines()] if exc else [head]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
