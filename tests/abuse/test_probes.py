"""Each bad-input class the random requests found, probed on every RPC (tests/abuse/probes.py).

Every answer must be OK or a clear status with a message (never INTERNAL/UNKNOWN, a crash, a
hang), like in test_fuzz_requests.py, but here deterministic: the same request every run, so
each RPC that still mishandles a class is a strict xfail naming the defect.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from tests.abuse.conftest import Stack
from tests.abuse.probes import out_of_range_times, probe, strings
from tests.abuse.rpc import all_methods, invoke, method_name, request_class
from tests.identity.conftest import ADMIN, TestApp, create_test_app

UNCLEAR = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
PROBES = {
    "nul": strings("a\x00b"),
    "long": strings("é" * 300),
    "time": out_of_range_times,
}
METHODS = {method_name(m): m for m in all_methods()}

#: The defect classes the probes found (all fixed; the probes and pinned requests keep them so).
NUL_DEFECT = (
    "a NUL character in a string field reaches asyncpg, whose CharacterNotInRepertoireError "
    "('invalid byte sequence for encoding \"UTF8\": 0x00') the interceptor maps to INTERNAL; "
    "the request should be INVALID_ARGUMENT naming the field"
)
TIME_DEFECT = (
    "Timestamp.ToDatetime() raises ValueError for seconds/nanos out of the protobuf range; "
    "the handler does not validate it first, so the caller gets INTERNAL instead of "
    "INVALID_ARGUMENT naming the field"
)
#: (probe, RPC) -> a defect still open (xfail strict: fixing it turns the case green).
KNOWN_DEFECTS: dict[tuple[str, str], str] = {}

#: Single requests the random search found that the probes above do not reach (other fields
#: of a probe fail validation first): (RPC, request fields for an app id, defect).
PINNED: list[tuple[str, Callable[[str], dict[str, Any]], str]] = [
    (
        "AppsService.CreateApp",
        lambda app_id: {"app": {"display_name": "a\x00b"}},
        f"services/identity/apps_store.py insert_app: {NUL_DEFECT}",
    ),
    (
        "AppsService.ListApiKeys",
        lambda app_id: {"app_id": "a\x00b"},
        f"services/identity/apps_store.py list_api_keys: {NUL_DEFECT}",
    ),
    (
        "AppsService.UpdateApp",
        lambda app_id: {
            "app": {"app_id": "a\x00b", "display_name": "x"},
            "update_mask": {"paths": ["display_name"]},
        },
        f"services/identity/apps_store.py get_app_for_update: {NUL_DEFECT}",
    ),
    (
        "AppsService.CreateApiKey",
        lambda app_id: {"app_id": app_id, "scope": 1, "display_name": "a\x00b"},
        f"services/identity/apps_store.py insert_api_key: {NUL_DEFECT}",
    ),
    (
        "DeliveryService.UpdateDeliverySettings",
        lambda app_id: {
            "settings": {"default_timezone": "é" * 300},
            "update_mask": {"paths": ["default_timezone"]},
        },
        "services/delivery/validation.py check_timezone catches ZoneInfoNotFoundError and "
        "ValueError, but zoneinfo.ZoneInfo raises OSError (ENAMETOOLONG) for a name longer than "
        "a file name may be: INTERNAL instead of INVALID_ARGUMENT naming "
        "settings.default_timezone",
    ),
]


def _cases() -> list[Any]:
    cases = []
    for kind, setter in PROBES.items():
        for name, method in sorted(METHODS.items()):
            request = probe(method.input_type, setter)
            if request is None:
                continue
            reason = KNOWN_DEFECTS.get((kind, name))
            marks = (
                [pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)]
                if reason
                else []
            )
            cases.append(pytest.param(kind, name, request, id=f"{kind}-{name}", marks=marks))
    return cases


def _pinned() -> list[Any]:
    return [
        pytest.param(
            "pinned",
            name,
            fields,
            id=f"pinned-{name}",
        )
        for name, fields, defect in PINNED
    ]


@pytest.fixture(scope="module")
async def probe_app(stack: Stack) -> TestApp:
    return await create_test_app(stack.apps)


@pytest.mark.parametrize(("kind", "name", "request_"), _cases() + _pinned())
async def test_probe_gets_a_clear_answer(
    stack: Stack, probe_app: TestApp, kind: str, name: str, request_: Any
) -> None:
    method = METHODS[name]
    key = ADMIN if method.containing_service.name == "AppsService" else probe_app.server
    if callable(request_):  # a pinned request, made for this app
        request_ = request_class(method)(**request_(probe_app.app_id))
    requests = [request_, request_] if method.client_streaming else request_
    outcome = await invoke(
        stack.channel_of(method.containing_service.full_name), method, requests, key
    )
    assert outcome.code not in UNCLEAR, f"{name} answered {outcome}"
    if outcome.code != grpc.StatusCode.OK:
        assert outcome.message.strip()
