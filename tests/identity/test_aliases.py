"""Aliases: AddAlias, RemoveAlias, refs by alias, and their limits."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
import pytest
from tidings.events.v1.identity_change_pb2 import IdentityChange
from tidings.identity.v1 import identity_service_pb2 as pb
from tidings.identity.v1 import user_pb2, user_ref_pb2

from services.identity.users import MAX_ALIASES
from tests.identity.conftest import TestApp as AppKeys
from tests.identity.support import ChangeFeed, by_alias, by_id, ext, failure, new_id

if TYPE_CHECKING:
    from tidings.identity.v1.identity_service_pb2_grpc import (
        IdentityServiceAsyncStub as IdentityServiceStub,
    )


async def _user(stub: IdentityServiceStub, app: AppKeys) -> user_pb2.User:
    response = await stub.UpsertUser(
        pb.UpsertUserRequest(ref=ext(new_id()), user=user_pb2.User(first_name="A")),
        metadata=app.server,
    )
    user: user_pb2.User = response.user
    return user


async def _add(
    stub: IdentityServiceStub, app: AppKeys, ref: user_ref_pb2.UserRef, label: str, value: str
) -> user_pb2.User:
    user: user_pb2.User = await stub.AddAlias(
        pb.AddAliasRequest(ref=ref, alias=user_pb2.Alias(label=label, value=value)),
        metadata=app.server,
    )
    return user


async def test_an_alias_names_the_user_everywhere(
    identity_stub: IdentityServiceStub, app: AppKeys
) -> None:
    user = await _user(identity_stub, app)
    value = new_id("crm")
    added = await _add(identity_stub, app, by_id(user.user_id), "crm_id", value)
    assert [(a.label, a.value) for a in added.aliases] == [("crm_id", value)]
    got = await identity_stub.GetUser(
        pb.GetUserRequest(ref=by_alias("crm_id", value)), metadata=app.server
    )
    assert got.user_id == user.user_id
    updated = await identity_stub.UpsertUser(
        pb.UpsertUserRequest(ref=by_alias("crm_id", value), user=user_pb2.User(last_name="B")),
        metadata=app.server,
    )
    assert (updated.created, updated.user.user_id) == (False, user.user_id)
    # Adding the same alias again changes nothing.
    again = await _add(identity_stub, app, ext(user.external_id), "crm_id", value)
    assert [(a.label, a.value) for a in again.aliases] == [("crm_id", value)]


async def test_upsert_by_an_unknown_alias_creates_a_user_holding_it(
    identity_stub: IdentityServiceStub, app: AppKeys
) -> None:
    value = new_id("fb")
    created = await identity_stub.UpsertUser(
        pb.UpsertUserRequest(ref=by_alias("facebook_id", value)), metadata=app.server
    )
    assert created.created
    assert [(a.label, a.value) for a in created.user.aliases] == [("facebook_id", value)]
    assert created.user.external_id == ""


async def test_an_alias_belongs_to_one_user(
    identity_stub: IdentityServiceStub, app: AppKeys
) -> None:
    first, second = await _user(identity_stub, app), await _user(identity_stub, app)
    value = new_id("crm")
    await _add(identity_stub, app, by_id(first.user_id), "crm_id", value)
    taken = await failure(_add(identity_stub, app, by_id(second.user_id), "crm_id", value))
    assert (taken.code, taken.reason, taken.fields) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "ALIAS_TAKEN",
        ["alias.value"],
    )
    relabel = await failure(_add(identity_stub, app, by_id(first.user_id), "crm_id", new_id()))
    assert (relabel.code, relabel.reason) == (grpc.StatusCode.ALREADY_EXISTS, "ALIAS_LABEL_EXISTS")


async def test_at_most_ten_aliases(identity_stub: IdentityServiceStub, app: AppKeys) -> None:
    user = await _user(identity_stub, app)
    for i in range(MAX_ALIASES):
        await _add(identity_stub, app, by_id(user.user_id), f"label_{i}", new_id())
    full = await failure(_add(identity_stub, app, by_id(user.user_id), "one_more", new_id()))
    assert (full.code, full.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "ALIAS_LIMIT")
    assert full.fields == ["alias"]
    got = await identity_stub.GetUser(
        pb.GetUserRequest(ref=by_id(user.user_id)), metadata=app.server
    )
    assert len(got.aliases) == MAX_ALIASES


async def test_concurrent_adds_of_one_alias_give_it_to_one_user(
    identity_stub: IdentityServiceStub, app: AppKeys
) -> None:
    users = [await _user(identity_stub, app) for _ in range(4)]
    value = new_id("crm")
    outcomes = await asyncio.gather(
        *(_add(identity_stub, app, by_id(u.user_id), "crm_id", value) for u in users),
        return_exceptions=True,
    )
    winners = [o for o in outcomes if isinstance(o, user_pb2.User)]
    assert len(winners) == 1
    for outcome in outcomes:
        if isinstance(outcome, grpc.aio.AioRpcError):
            assert outcome.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize(
    ("label", "value", "field"),
    [
        ("external_id", "v", "alias.label"),
        ("user_id", "v", "alias.label"),
        ("CRM", "v", "alias.label"),
        ("", "v", "alias.label"),
        ("crm_id", "null", "alias.value"),
        ("crm_id", "", "alias.value"),
        ("crm_id", "0", "alias.value"),
        ("crm_id", "x" * 201, "alias.value"),
    ],
)
async def test_bad_aliases_are_refused(
    identity_stub: IdentityServiceStub, app: AppKeys, label: str, value: str, field: str
) -> None:
    user = await _user(identity_stub, app)
    bad = await failure(_add(identity_stub, app, by_id(user.user_id), label, value))
    assert (bad.code, bad.fields) == (grpc.StatusCode.INVALID_ARGUMENT, [field])


async def test_remove_alias(identity_stub: IdentityServiceStub, app: AppKeys) -> None:
    user = await _user(identity_stub, app)
    value = new_id("crm")
    await _add(identity_stub, app, by_id(user.user_id), "crm_id", value)
    async with ChangeFeed(app.app_id) as feed:
        removed = await identity_stub.RemoveAlias(
            pb.RemoveAliasRequest(ref=by_alias("crm_id", value), label="crm_id"),
            metadata=app.server,
        )
        assert list(removed.aliases) == []
        facts = await feed.about([user.user_id], 1)
    assert facts[0].kind == IdentityChange.KIND_USER_UPDATED
    assert list(facts[0].changed_fields) == ["aliases.crm_id"]
    gone = await failure(
        identity_stub.GetUser(pb.GetUserRequest(ref=by_alias("crm_id", value)), metadata=app.server)
    )
    assert gone.code == grpc.StatusCode.NOT_FOUND
    missing = await failure(
        identity_stub.RemoveAlias(
            pb.RemoveAliasRequest(ref=by_id(user.user_id), label="crm_id"), metadata=app.server
        )
    )
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "ALIAS_NOT_FOUND")
    # The freed value can be given to someone else.
    other = await _user(identity_stub, app)
    await _add(identity_stub, app, by_id(other.user_id), "crm_id", value)
