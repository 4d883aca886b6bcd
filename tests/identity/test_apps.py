"""AppsService through the real gRPC server: apps, API keys, and how keys authenticate.

Every call goes to the identity subprocess of ``conftest.py``; errors are checked by status code,
``ErrorInfo.reason`` and the ``BadRequest`` field a caller would fix.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import asyncpg
import grpc
import grpc.aio
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tidings.identity.v1 import (
    app_pb2,
    apps_service_pb2,
    identity_service_pb2,
)

from services.identity import apps
from services.runtime.auth import Principal, Scope
from services.runtime.db import create_pool
from services.runtime.errors import FailedPrecondition, NotFound
from tests.conftest import temporary_database, unique_name
from tests.e2e.processes import TEST_ADMIN_KEY
from tests.identity.conftest import ADMIN, bearer

if TYPE_CHECKING:
    # Only for annotations: imported at run time, pytest would try to collect it as tests.
    from tidings.identity.v1.apps_service_pb2_grpc import AppsServiceAsyncStub as AppsStub
    from tidings.identity.v1.identity_service_pb2_grpc import (
        IdentityServiceAsyncStub as IdentityStub,
    )

    from tests.identity.conftest import TestApp

#: The migrations creating the apps tables and their login secret (read directly, so these
#: tests need no other table).
APPS_MIGRATIONS = [
    Path(apps.__file__).resolve().parent / "migrations" / name
    for name in ("0002_apps.sql", "0011_app_login_secret.sql")
]


class Failure:
    """What a failed call told the caller: code, ErrorInfo reason, BadRequest fields."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        self.code = error.code()
        self.reason = ""
        self.fields: list[str] = []
        # grpc-stubs types from_call for sync calls only; an AioRpcError has the same API.
        status = rpc_status.from_call(cast(Any, error))
        for detail in status.details if status is not None else ():
            info = error_details_pb2.ErrorInfo()
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(info):
                self.reason = info.reason
            elif detail.Unpack(bad_request):
                self.fields.extend(v.field for v in bad_request.field_violations)

    def __repr__(self) -> str:
        return f"Failure({self.code}, {self.reason!r}, {self.fields})"


async def failure(call: object) -> Failure:
    """Await ``call``, which must fail, and describe how."""
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return Failure(error)
    raise AssertionError("the call succeeded but was expected to fail")


def new_app_request(**settings: object) -> apps_service_pb2.CreateAppRequest:
    return apps_service_pb2.CreateAppRequest(
        app=app_pb2.App(
            display_name=unique_name("app"),
            settings=app_pb2.AppSettings(**settings),  # type: ignore[arg-type]
        )
    )


# --- CreateApp / GetApp -----------------------------------------------------------------------


async def test_create_app_returns_the_stored_app(apps_stub: AppsStub) -> None:
    created = await apps_stub.CreateApp(
        new_app_request(
            allow_client_login=True,
            undefined_fields=app_pb2.UNDEFINED_FIELD_POLICY_REJECT,
            default_timezone="Europe/Madrid",
        ),
        metadata=ADMIN,
    )
    assert created.app_id.startswith("app_")
    assert len(created.app_id) == len("app_") + 16
    assert created.settings.allow_client_login
    assert created.settings.undefined_fields == app_pb2.UNDEFINED_FIELD_POLICY_REJECT
    assert created.settings.default_timezone == "Europe/Madrid"
    assert created.HasField("create_time")
    assert created.create_time == created.update_time

    fetched = await apps_stub.GetApp(
        apps_service_pb2.GetAppRequest(app_id=created.app_id), metadata=ADMIN
    )
    assert fetched == created


async def test_create_app_defaults(apps_stub: AppsStub) -> None:
    created = await apps_stub.CreateApp(new_app_request(), metadata=ADMIN)
    # Unset policy is reported as what it means (auto-define); client login is off.
    assert created.settings.undefined_fields == app_pb2.UNDEFINED_FIELD_POLICY_AUTO_DEFINE
    assert not created.settings.allow_client_login
    assert created.settings.default_timezone == ""


@pytest.mark.parametrize(
    ("display_name", "timezone", "fields"),
    [
        ("", "", ["app.display_name"]),
        ("   ", "", ["app.display_name"]),
        ("x" * 201, "", ["app.display_name"]),
        ("ok", "Mars/Olympus", ["app.settings.default_timezone"]),
        ("ok", "localtime", ["app.settings.default_timezone"]),
        ("ok", "../../etc/passwd", ["app.settings.default_timezone"]),
        ("", "Nowhere", ["app.display_name", "app.settings.default_timezone"]),
    ],
)
async def test_create_app_refuses_invalid_fields(
    apps_stub: AppsStub, display_name: str, timezone: str, fields: list[str]
) -> None:
    request = apps_service_pb2.CreateAppRequest(
        app=app_pb2.App(
            display_name=display_name,
            settings=app_pb2.AppSettings(default_timezone=timezone),
        )
    )
    result = await failure(apps_stub.CreateApp(request, metadata=ADMIN))
    assert result.code == grpc.StatusCode.INVALID_ARGUMENT
    assert result.fields == fields


async def test_display_name_of_200_characters_is_accepted(apps_stub: AppsStub) -> None:
    request = apps_service_pb2.CreateAppRequest(app=app_pb2.App(display_name="é" * 200))
    created = await apps_stub.CreateApp(request, metadata=ADMIN)
    assert created.display_name == "é" * 200


async def test_create_app_is_idempotent_by_request_id(apps_stub: AppsStub) -> None:
    request = new_app_request()
    request.request_id = str(uuid.uuid4())
    # Concurrent retries too: the unique request id lets exactly one app through.
    results = await asyncio.gather(
        *(apps_stub.CreateApp(request, metadata=ADMIN) for _ in range(5))
    )
    assert len({app.app_id for app in results}) == 1
    again = await apps_stub.CreateApp(request, metadata=ADMIN)
    assert again == results[0]

    other = await apps_stub.CreateApp(new_app_request(), metadata=ADMIN)
    assert other.app_id != again.app_id


async def test_create_app_refuses_a_request_id_that_is_not_a_uuid(apps_stub: AppsStub) -> None:
    request = new_app_request()
    request.request_id = "retry-1"
    result = await failure(apps_stub.CreateApp(request, metadata=ADMIN))
    assert (result.code, result.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["request_id"])


async def test_get_unknown_app_is_not_found(apps_stub: AppsStub) -> None:
    result = await failure(
        apps_stub.GetApp(
            apps_service_pb2.GetAppRequest(app_id="app_0000000000000000"), metadata=ADMIN
        )
    )
    assert (result.code, result.reason) == (grpc.StatusCode.NOT_FOUND, "APP_NOT_FOUND")
    empty = await failure(apps_stub.GetApp(apps_service_pb2.GetAppRequest(), metadata=ADMIN))
    assert (empty.code, empty.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["app_id"])


# --- ListApps ---------------------------------------------------------------------------------


async def _all_apps(apps_stub: AppsStub, page_size: int) -> list[app_pb2.App]:
    found: list[app_pb2.App] = []
    token = ""
    while True:
        page = await apps_stub.ListApps(
            apps_service_pb2.ListAppsRequest(page_size=page_size, page_token=token),
            metadata=ADMIN,
        )
        assert len(page.apps) <= page_size
        found.extend(page.apps)
        token = page.next_page_token
        if not token:
            return found


async def test_list_apps_pages_oldest_first(apps_stub: AppsStub) -> None:
    mine = [(await apps_stub.CreateApp(new_app_request(), metadata=ADMIN)).app_id for _ in range(3)]
    whole = await _all_apps(apps_stub, 1000)
    paged = await _all_apps(apps_stub, 2)
    # Nothing else creates apps while this test runs, so both walks see the same list.
    assert [a.app_id for a in paged] == [a.app_id for a in whole]
    assert len({a.app_id for a in whole}) == len(whole)
    ids = [a.app_id for a in whole]
    assert [i for i in ids if i in mine] == mine
    times = [(a.create_time.ToDatetime(), a.app_id) for a in whole]
    assert times == sorted(times)


async def test_list_apps_default_page_size_is_50(apps_stub: AppsStub) -> None:
    while len(await _all_apps(apps_stub, 1000)) <= 50:
        await apps_stub.CreateApp(new_app_request(), metadata=ADMIN)
    page = await apps_stub.ListApps(apps_service_pb2.ListAppsRequest(), metadata=ADMIN)
    assert len(page.apps) == 50
    assert page.next_page_token


@pytest.mark.parametrize(
    ("page_size", "page_token", "field"),
    [
        (-1, "", "page_size"),
        (0, "garbage!", "page_token"),
        (0, base64.urlsafe_b64encode(b'["apps","yesterday","app_1"]').decode(), "page_token"),
        (0, base64.urlsafe_b64encode(b'["apps","2024-01-01T00:00:00","x"]').decode(), "page_token"),
        # A ListApiKeys token is not a ListApps token.
        (
            0,
            base64.urlsafe_b64encode(b'["api_keys","2024-01-01T00:00:00+00:00","k"]').decode(),
            "page_token",
        ),
    ],
)
async def test_list_apps_refuses_bad_paging(
    apps_stub: AppsStub, page_size: int, page_token: str, field: str
) -> None:
    request = apps_service_pb2.ListAppsRequest(page_size=page_size, page_token=page_token)
    result = await failure(apps_stub.ListApps(request, metadata=ADMIN))
    assert (result.code, result.fields) == (grpc.StatusCode.INVALID_ARGUMENT, [field])


# --- UpdateApp --------------------------------------------------------------------------------


def update(
    app_id: str,
    paths: list[str],
    *,
    display_name: str = "",
    settings: app_pb2.AppSettings | None = None,
) -> apps_service_pb2.UpdateAppRequest:
    return apps_service_pb2.UpdateAppRequest(
        app=app_pb2.App(app_id=app_id, display_name=display_name, settings=settings),
        update_mask=field_mask_pb2.FieldMask(paths=paths),
    )


async def _madrid_app(apps_stub: AppsStub) -> app_pb2.App:
    return await apps_stub.CreateApp(
        new_app_request(
            default_timezone="Europe/Madrid",
            undefined_fields=app_pb2.UNDEFINED_FIELD_POLICY_REJECT,
        ),
        metadata=ADMIN,
    )


async def test_update_display_name_only(apps_stub: AppsStub) -> None:
    app = await _madrid_app(apps_stub)
    updated = await apps_stub.UpdateApp(
        # The settings in the request are ignored: the mask does not name them.
        update(
            app.app_id, ["display_name"], display_name="Renamed", settings=app_pb2.AppSettings()
        ),
        metadata=ADMIN,
    )
    assert updated.display_name == "Renamed"
    assert updated.settings == app.settings
    assert updated.create_time == app.create_time
    assert updated.update_time.ToDatetime() > app.update_time.ToDatetime()
    fetched = await apps_stub.GetApp(
        apps_service_pb2.GetAppRequest(app_id=app.app_id), metadata=ADMIN
    )
    assert fetched == updated


async def test_update_one_setting(apps_stub: AppsStub) -> None:
    app = await _madrid_app(apps_stub)
    updated = await apps_stub.UpdateApp(
        update(
            app.app_id,
            ["settings.allow_client_login"],
            settings=app_pb2.AppSettings(allow_client_login=True),
        ),
        metadata=ADMIN,
    )
    assert updated.display_name == app.display_name
    assert updated.settings == app_pb2.AppSettings(
        allow_client_login=True,
        undefined_fields=app_pb2.UNDEFINED_FIELD_POLICY_REJECT,
        default_timezone="Europe/Madrid",
    )


@pytest.mark.parametrize("paths", [["settings"], [], ["*"]])
async def test_update_whole_settings(apps_stub: AppsStub, paths: list[str]) -> None:
    app = await _madrid_app(apps_stub)
    settings = app_pb2.AppSettings(allow_client_login=True, default_timezone="America/New_York")
    updated = await apps_stub.UpdateApp(
        update(app.app_id, paths, display_name="All of it", settings=settings), metadata=ADMIN
    )
    assert updated.settings == app_pb2.AppSettings(
        allow_client_login=True,
        undefined_fields=app_pb2.UNDEFINED_FIELD_POLICY_AUTO_DEFINE,
        default_timezone="America/New_York",
    )
    # "settings" alone leaves the name; an empty mask or "*" replaces everything.
    expected_name = app.display_name if paths == ["settings"] else "All of it"
    assert updated.display_name == expected_name


async def test_update_validates_only_the_masked_fields(apps_stub: AppsStub) -> None:
    app = await _madrid_app(apps_stub)
    bad = app_pb2.AppSettings(default_timezone="Not/AZone", allow_client_login=True)
    result = await failure(
        apps_stub.UpdateApp(
            update(app.app_id, ["settings.default_timezone"], settings=bad), metadata=ADMIN
        )
    )
    assert (result.code, result.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["app.settings.default_timezone"],
    )
    # Not named by the mask: the bad zone (and the empty name) are not looked at.
    ok = await apps_stub.UpdateApp(
        update(app.app_id, ["settings.allow_client_login"], settings=bad), metadata=ADMIN
    )
    assert ok.settings.default_timezone == "Europe/Madrid"
    assert ok.settings.allow_client_login


@pytest.mark.parametrize(
    ("paths", "display_name", "field"),
    [
        (["display_name"], "", "app.display_name"),
        (["display_name"], "x" * 201, "app.display_name"),
        (["name"], "ok", "update_mask"),
        (["settings.colour"], "ok", "update_mask"),
        (["display_name", "*"], "ok", "update_mask"),
    ],
)
async def test_update_refuses_invalid_requests(
    apps_stub: AppsStub, paths: list[str], display_name: str, field: str
) -> None:
    app = await _madrid_app(apps_stub)
    result = await failure(
        apps_stub.UpdateApp(update(app.app_id, paths, display_name=display_name), metadata=ADMIN)
    )
    assert (result.code, result.fields) == (grpc.StatusCode.INVALID_ARGUMENT, [field])


async def test_update_unknown_app(apps_stub: AppsStub) -> None:
    result = await failure(
        apps_stub.UpdateApp(
            update("app_ffffffffffffffff", ["display_name"], display_name="x"), metadata=ADMIN
        )
    )
    assert (result.code, result.reason) == (grpc.StatusCode.NOT_FOUND, "APP_NOT_FOUND")
    missing = await failure(
        apps_stub.UpdateApp(update("", ["display_name"], display_name="x"), metadata=ADMIN)
    )
    assert (missing.code, missing.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["app.app_id"])


async def test_concurrent_partial_updates_keep_each_other(apps_stub: AppsStub) -> None:
    app = await _madrid_app(apps_stub)
    await asyncio.gather(
        apps_stub.UpdateApp(
            update(app.app_id, ["display_name"], display_name="Concurrent"), metadata=ADMIN
        ),
        apps_stub.UpdateApp(
            update(
                app.app_id,
                ["settings.allow_client_login"],
                settings=app_pb2.AppSettings(allow_client_login=True),
            ),
            metadata=ADMIN,
        ),
    )
    final = await apps_stub.GetApp(
        apps_service_pb2.GetAppRequest(app_id=app.app_id), metadata=ADMIN
    )
    assert final.display_name == "Concurrent"
    assert final.settings.allow_client_login
    assert final.settings.default_timezone == "Europe/Madrid"


# --- login secret -----------------------------------------------------------------------------


def _with_secret(secret: str) -> apps_service_pb2.CreateAppRequest:
    request = new_app_request(allow_client_login=True)
    request.app.login_secret = secret
    return request


async def test_the_login_secret_is_never_returned(apps_stub: AppsStub) -> None:
    secret = secrets.token_urlsafe(32)
    created = await apps_stub.CreateApp(_with_secret(secret), metadata=ADMIN)
    fetched = await apps_stub.GetApp(
        apps_service_pb2.GetAppRequest(app_id=created.app_id), metadata=ADMIN
    )
    [listed] = [a for a in await _all_apps(apps_stub, 1000) if a.app_id == created.app_id]
    for app in (created, fetched, listed):
        assert app.has_login_secret
        assert app.login_secret == ""
        assert secret.encode() not in app.SerializeToString()


@pytest.mark.parametrize("paths", [[], ["*"], ["settings"], ["display_name"]])
async def test_only_a_mask_naming_the_login_secret_changes_it(
    apps_stub: AppsStub, paths: list[str]
) -> None:
    created = await apps_stub.CreateApp(_with_secret(secrets.token_urlsafe(32)), metadata=ADMIN)
    # A read-modify-write: what GetApp returns (no secret) goes back whole.
    kept = await apps_stub.UpdateApp(
        update(created.app_id, paths, display_name="Same", settings=created.settings),
        metadata=ADMIN,
    )
    assert kept.has_login_secret
    removed = await apps_stub.UpdateApp(update(created.app_id, ["login_secret"]), metadata=ADMIN)
    assert not removed.has_login_secret
    assert removed.display_name == kept.display_name
    request = update(created.app_id, ["login_secret"])
    request.app.login_secret = secrets.token_urlsafe(32)
    assert (await apps_stub.UpdateApp(request, metadata=ADMIN)).has_login_secret


@pytest.mark.parametrize(
    "secret",
    ["x" * 31, "x" * 257, "x" * 20 + " " + "x" * 20, "ñ" * 40, "x" * 40 + "\n"],
    ids=["short", "long", "space", "non-ascii", "newline"],
)
async def test_a_bad_login_secret_is_refused(apps_stub: AppsStub, secret: str) -> None:
    result = await failure(apps_stub.CreateApp(_with_secret(secret), metadata=ADMIN))
    assert (result.code, result.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["app.login_secret"])
    app = await apps_stub.CreateApp(new_app_request(), metadata=ADMIN)
    request = update(app.app_id, ["login_secret"])
    request.app.login_secret = secret
    result = await failure(apps_stub.UpdateApp(request, metadata=ADMIN))
    assert (result.code, result.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["app.login_secret"])
    # Not named by the mask, it is not looked at.
    request.update_mask.paths[:] = ["display_name"]
    request.app.display_name = "Renamed"
    assert not (await apps_stub.UpdateApp(request, metadata=ADMIN)).has_login_secret


# --- API keys ---------------------------------------------------------------------------------


def create_key(
    app_id: str, scope: app_pb2.ApiKeyScope.ValueType, display_name: str = ""
) -> apps_service_pb2.CreateApiKeyRequest:
    return apps_service_pb2.CreateApiKeyRequest(
        app_id=app_id, scope=scope, display_name=display_name
    )


@pytest.mark.parametrize(
    ("scope", "head"),
    [(app_pb2.API_KEY_SCOPE_SERVER, "tk_server_"), (app_pb2.API_KEY_SCOPE_CLIENT, "tk_client_")],
)
async def test_create_api_key_returns_the_secret_once(
    apps_stub: AppsStub, app: TestApp, scope: app_pb2.ApiKeyScope.ValueType, head: str
) -> None:
    created = await apps_stub.CreateApiKey(
        create_key(app.app_id, scope, "backend prod"), metadata=ADMIN
    )
    secret, key = created.secret, created.api_key
    assert secret.startswith(head)
    assert len(secret) == len(head) + 43
    assert key.key_id.startswith("key_")
    assert (key.app_id, key.scope, key.display_name) == (app.app_id, scope, "backend prod")
    assert secret.startswith(key.prefix)
    assert len(key.prefix) == len(head) + 8
    assert key.HasField("create_time")
    assert not key.HasField("revoke_time")

    listed = await apps_stub.ListApiKeys(
        apps_service_pb2.ListApiKeysRequest(app_id=app.app_id), metadata=ADMIN
    )
    assert key in listed.api_keys
    # Prefix only: the secret appears nowhere in what a list returns.
    assert secret.encode() not in listed.SerializeToString()
    assert secret[len(key.prefix) :].encode() not in listed.SerializeToString()


@pytest.mark.parametrize(
    ("request_", "code", "fields"),
    [
        (
            create_key("", app_pb2.API_KEY_SCOPE_SERVER),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["app_id"],
        ),
        (
            create_key("APP", app_pb2.API_KEY_SCOPE_UNSPECIFIED),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["scope"],
        ),
        (create_key("APP", 7), grpc.StatusCode.INVALID_ARGUMENT, ["scope"]),  # type: ignore[arg-type]
        (
            create_key("APP", app_pb2.API_KEY_SCOPE_CLIENT, "x" * 201),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["display_name"],
        ),
        (
            create_key("app_0000000000000000", app_pb2.API_KEY_SCOPE_SERVER),
            grpc.StatusCode.NOT_FOUND,
            [],
        ),
    ],
)
async def test_create_api_key_refuses_invalid_requests(
    apps_stub: AppsStub,
    app: TestApp,
    request_: apps_service_pb2.CreateApiKeyRequest,
    code: grpc.StatusCode,
    fields: list[str],
) -> None:
    if request_.app_id == "APP":
        request_.app_id = app.app_id
    result = await failure(apps_stub.CreateApiKey(request_, metadata=ADMIN))
    assert (result.code, result.fields) == (code, fields)


async def test_list_api_keys_pages_newest_first(apps_stub: AppsStub, app: TestApp) -> None:
    for index in range(5):
        await apps_stub.CreateApiKey(
            create_key(app.app_id, app_pb2.API_KEY_SCOPE_SERVER, f"k{index}"), metadata=ADMIN
        )
    seen: list[app_pb2.ApiKey] = []
    token = ""
    while True:
        page = await apps_stub.ListApiKeys(
            apps_service_pb2.ListApiKeysRequest(app_id=app.app_id, page_size=2, page_token=token),
            metadata=ADMIN,
        )
        assert len(page.api_keys) <= 2
        seen.extend(page.api_keys)
        token = page.next_page_token
        if not token:
            break
    # The fixture's two keys, then these five: seven in all, newest first, each once.
    assert len(seen) == 7
    assert len({key.key_id for key in seen}) == 7
    assert [key.display_name for key in seen[:5]] == ["k4", "k3", "k2", "k1", "k0"]
    order = [(key.create_time.ToDatetime(), key.key_id) for key in seen]
    assert order == sorted(order, reverse=True)


async def test_list_api_keys_of_an_app_shows_only_its_keys(
    apps_stub: AppsStub, app: TestApp, other_app: TestApp
) -> None:
    mine = await apps_stub.ListApiKeys(
        apps_service_pb2.ListApiKeysRequest(app_id=app.app_id), metadata=ADMIN
    )
    theirs = await apps_stub.ListApiKeys(
        apps_service_pb2.ListApiKeysRequest(app_id=other_app.app_id), metadata=ADMIN
    )
    assert {key.app_id for key in mine.api_keys} == {app.app_id}
    assert {key.app_id for key in theirs.api_keys} == {other_app.app_id}
    assert not {k.key_id for k in mine.api_keys} & {k.key_id for k in theirs.api_keys}
    assert len(mine.api_keys) == len(theirs.api_keys) == 2


async def test_list_api_keys_refuses_bad_requests(apps_stub: AppsStub, app: TestApp) -> None:
    unknown = await failure(
        apps_stub.ListApiKeys(
            apps_service_pb2.ListApiKeysRequest(app_id="app_0000000000000000"), metadata=ADMIN
        )
    )
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "APP_NOT_FOUND")
    for request, field in [
        (apps_service_pb2.ListApiKeysRequest(), "app_id"),
        (apps_service_pb2.ListApiKeysRequest(app_id=app.app_id, page_size=-5), "page_size"),
        (apps_service_pb2.ListApiKeysRequest(app_id=app.app_id, page_token="%%%"), "page_token"),
    ]:
        result = await failure(apps_stub.ListApiKeys(request, metadata=ADMIN))
        assert (result.code, result.fields) == (grpc.StatusCode.INVALID_ARGUMENT, [field])


# --- RevokeApiKey and AuthenticateKey ---------------------------------------------------------


async def _identity_code(identity_stub: IdentityStub, key: str) -> Failure | None:
    """How an IdentityService call with ``key`` fails (None if it succeeds)."""
    try:
        await identity_stub.GetUser(identity_service_pb2.GetUserRequest(), metadata=bearer(key))
    except grpc.aio.AioRpcError as error:
        return Failure(error)
    return None


async def test_revoked_key_is_refused_from_the_next_call(
    apps_stub: AppsStub,
    identity_stub: IdentityStub,
    app: TestApp,
) -> None:
    created = await apps_stub.CreateApiKey(
        create_key(app.app_id, app_pb2.API_KEY_SCOPE_SERVER), metadata=ADMIN
    )
    before = await _identity_code(identity_stub, created.secret)
    assert before is None or before.code != grpc.StatusCode.UNAUTHENTICATED

    revoked = await apps_stub.RevokeApiKey(
        apps_service_pb2.RevokeApiKeyRequest(app_id=app.app_id, key_id=created.api_key.key_id),
        metadata=ADMIN,
    )
    assert revoked.HasField("revoke_time")
    after = await _identity_code(identity_stub, created.secret)
    assert after is not None
    assert (after.code, after.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_REVOKED")

    # Idempotent: revoking again answers the same key with the first revoke time.
    again = await apps_stub.RevokeApiKey(
        apps_service_pb2.RevokeApiKeyRequest(app_id=app.app_id, key_id=created.api_key.key_id),
        metadata=ADMIN,
    )
    assert again == revoked
    listed = await apps_stub.ListApiKeys(
        apps_service_pb2.ListApiKeysRequest(app_id=app.app_id), metadata=ADMIN
    )
    assert revoked in listed.api_keys
    # The app's other keys still work.
    still = await _identity_code(identity_stub, app.server_key)
    assert still is None or still.code != grpc.StatusCode.UNAUTHENTICATED


async def test_key_revoked_while_cached_is_refused_on_the_next_call(
    apps_stub: AppsStub,
    identity_stub: IdentityStub,
    app: TestApp,
) -> None:
    created = await apps_stub.CreateApiKey(
        create_key(app.app_id, app_pb2.API_KEY_SCOPE_SERVER), metadata=ADMIN
    )
    # Several accepted calls: the first caches the key, the others are served from the cache.
    for _ in range(3):
        accepted = await _identity_code(identity_stub, created.secret)
        assert accepted is None or accepted.code != grpc.StatusCode.UNAUTHENTICATED

    await apps_stub.RevokeApiKey(
        apps_service_pb2.RevokeApiKeyRequest(app_id=app.app_id, key_id=created.api_key.key_id),
        metadata=ADMIN,
    )
    after = await _identity_code(identity_stub, created.secret)
    assert after is not None
    assert (after.code, after.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_REVOKED")


async def test_revoke_is_scoped_to_the_app(
    apps_stub: AppsStub, app: TestApp, other_app: TestApp
) -> None:
    theirs = await apps_stub.ListApiKeys(
        apps_service_pb2.ListApiKeysRequest(app_id=other_app.app_id), metadata=ADMIN
    )
    for key in theirs.api_keys:
        result = await failure(
            apps_stub.RevokeApiKey(
                apps_service_pb2.RevokeApiKeyRequest(app_id=app.app_id, key_id=key.key_id),
                metadata=ADMIN,
            )
        )
        assert (result.code, result.reason) == (grpc.StatusCode.NOT_FOUND, "API_KEY_NOT_FOUND")
    for secret in (other_app.server_key, other_app.client_key):
        key = await apps_stub.AuthenticateKey(
            apps_service_pb2.AuthenticateKeyRequest(secret=secret), metadata=ADMIN
        )
        assert key.app_id == other_app.app_id
    missing = await failure(
        apps_stub.RevokeApiKey(
            apps_service_pb2.RevokeApiKeyRequest(app_id=app.app_id), metadata=ADMIN
        )
    )
    assert (missing.code, missing.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["key_id"])


async def test_authenticate_key(apps_stub: AppsStub, app: TestApp) -> None:
    server = await apps_stub.AuthenticateKey(
        apps_service_pb2.AuthenticateKeyRequest(secret=app.server_key), metadata=ADMIN
    )
    client = await apps_stub.AuthenticateKey(
        apps_service_pb2.AuthenticateKeyRequest(secret=app.client_key), metadata=ADMIN
    )
    assert (server.app_id, server.scope) == (app.app_id, app_pb2.API_KEY_SCOPE_SERVER)
    assert (client.app_id, client.scope) == (app.app_id, app_pb2.API_KEY_SCOPE_CLIENT)
    assert app.server_key.startswith(server.prefix)
    assert server.key_id != client.key_id

    await apps_stub.RevokeApiKey(
        apps_service_pb2.RevokeApiKeyRequest(app_id=app.app_id, key_id=client.key_id),
        metadata=ADMIN,
    )
    for secret, reason in [
        (app.client_key, "API_KEY_REVOKED"),
        ("tk_client_" + "B" * 43, "API_KEY_INVALID"),
        (app.server_key[:-1], "API_KEY_INVALID"),
        (TEST_ADMIN_KEY, "API_KEY_INVALID"),  # the admin key is not an app's key
    ]:
        result = await failure(
            apps_stub.AuthenticateKey(
                apps_service_pb2.AuthenticateKeyRequest(secret=secret), metadata=ADMIN
            )
        )
        assert (result.code, result.reason) == (grpc.StatusCode.UNAUTHENTICATED, reason), secret
    empty = await failure(
        apps_stub.AuthenticateKey(apps_service_pb2.AuthenticateKeyRequest(), metadata=ADMIN)
    )
    assert (empty.code, empty.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["secret"])


async def test_app_keys_cannot_use_apps_service(
    apps_stub: AppsStub, app: TestApp, other_app: TestApp
) -> None:
    # An app's own server key can neither read its app nor another app's, nor mint keys.
    for key in (app.server_key, app.client_key):
        for call in (
            apps_stub.GetApp(
                apps_service_pb2.GetAppRequest(app_id=app.app_id), metadata=bearer(key)
            ),
            apps_stub.GetApp(
                apps_service_pb2.GetAppRequest(app_id=other_app.app_id), metadata=bearer(key)
            ),
            apps_stub.ListApiKeys(
                apps_service_pb2.ListApiKeysRequest(app_id=other_app.app_id), metadata=bearer(key)
            ),
            apps_stub.CreateApiKey(
                create_key(app.app_id, app_pb2.API_KEY_SCOPE_SERVER), metadata=bearer(key)
            ),
        ):
            result = await failure(call)
            assert (result.code, result.reason) == (
                grpc.StatusCode.PERMISSION_DENIED,
                "KEY_SCOPE_INSUFFICIENT",
            )


# --- the store, on its own database -------------------------------------------------------------


@pytest.fixture
async def apps_pool() -> AsyncIterator[asyncpg.Pool]:
    """A pool on a scratch database holding just the apps tables (migration 0002)."""
    async with temporary_database() as dsn:
        pool = await create_pool(dsn, min_size=1, max_size=2)
        try:
            for migration in APPS_MIGRATIONS:
                await pool.execute(migration.read_text())
            yield pool
        finally:
            await pool.close()


async def test_only_the_hash_of_a_secret_is_stored(apps_pool: asyncpg.Pool) -> None:
    app = await apps.create_app(
        apps_pool, display_name="Stored", settings=apps.AppSettingsRecord(), request_id=""
    )
    created = await apps.create_api_key(
        apps_pool, app_id=app.app_id, scope=Scope.CLIENT, display_name="sdk"
    )
    row = await apps_pool.fetchrow(
        "SELECT * FROM api_keys WHERE key_id = $1", created.api_key.key_id
    )
    assert row is not None
    assert row["secret_hash"] == hashlib.sha256(created.secret.encode()).digest()
    random_part = created.secret[len("tk_client_") :]
    for column, value in row.items():
        assert random_part not in str(value), column
    key = await apps.authenticate_secret(apps_pool, created.secret)
    assert apps.principal_for(key) == Principal(
        app_id=app.app_id, key_id=created.api_key.key_id, scope=Scope.CLIENT
    )


async def test_get_app_settings(apps_pool: asyncpg.Pool) -> None:
    plain = await apps.create_app(
        apps_pool, display_name="Plain", settings=apps.AppSettingsRecord(), request_id=""
    )
    async with apps_pool.acquire() as conn:
        settings = await apps.get_app_settings(conn, plain.app_id)
        assert settings == apps.AppSettingsRecord(
            allow_client_login=False, undefined_fields="auto_define", default_timezone=""
        )
        assert settings.effective_timezone == "UTC"

        strict = await apps.create_app(
            apps_pool,
            display_name="Strict",
            settings=apps.AppSettingsRecord(
                allow_client_login=True, undefined_fields="reject", default_timezone="Asia/Tokyo"
            ),
            request_id="",
        )
        settings = await apps.get_app_settings(conn, strict.app_id)
        assert (settings.allow_client_login, settings.undefined_fields) == (True, "reject")
        assert settings.effective_timezone == "Asia/Tokyo"

        # A row written before a setting existed reads as the defaults.
        await conn.execute("UPDATE apps SET settings = '{}' WHERE app_id = $1", strict.app_id)
        assert await apps.get_app_settings(conn, strict.app_id) == apps.AppSettingsRecord()

        with pytest.raises(NotFound) as raised:
            await apps.get_app_settings(conn, "app_0000000000000000")
        assert raised.value.reason == "APP_NOT_FOUND"


async def test_the_login_secret_is_stored_sealed_for_its_app(apps_pool: asyncpg.Pool) -> None:
    secret = secrets.token_urlsafe(32)
    sealed_app, plain = [
        await apps.create_app(
            apps_pool,
            display_name=name,
            settings=apps.AppSettingsRecord(),
            request_id="",
            login_secret=value,
        )
        for name, value in (("Sealed", secret), ("Plain", ""))
    ]
    row = await apps_pool.fetchrow("SELECT * FROM apps WHERE app_id = $1", sealed_app.app_id)
    assert row is not None
    assert secret.encode() not in row["login_secret"]
    for column, value in row.items():
        assert secret not in str(value), column
    async with apps_pool.acquire() as conn:
        assert await apps.login_secret(conn, sealed_app.app_id) == secret.encode()
        assert await apps.login_secret(conn, plain.app_id) is None
        # Copied to another app, the sealed bytes do not open (bound to their app).
        await conn.execute(
            "UPDATE apps SET login_secret = $2 WHERE app_id = $1", plain.app_id, row["login_secret"]
        )
        with pytest.raises(FailedPrecondition) as raised:
            await apps.login_secret(conn, plain.app_id)
        assert raised.value.reason == "LOGIN_SECRET_UNREADABLE"


def test_secrets_are_recognised_by_shape() -> None:
    for scope in (Scope.SERVER, Scope.CLIENT):
        secret = apps.new_secret(scope)
        assert apps.looks_like_secret(secret.value)
        assert secret.value.startswith(f"tk_{scope.value}_")
        assert secret.secret_hash == apps.hash_secret(secret.value)
    assert not apps.looks_like_secret("tk_admin_" + "A" * 43)
    assert not apps.looks_like_secret("tk_server_" + "A" * 42)
    assert not apps.looks_like_secret("tk_server_" + "A" * 42 + "!")
    assert len({apps.new_secret(Scope.SERVER).value for _ in range(100)}) == 100
