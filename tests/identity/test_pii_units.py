"""The sealing of PII attribute values (services/identity/pii.py), without a database."""

from __future__ import annotations

import json
import uuid

import pytest

from services.identity.pii import SEALED_KEY, PiiBox, context, is_sealed, open_attributes
from services.runtime.secrets_box import SecretBoxError

APP = "app_units"
USER = uuid.UUID("2f1e2c0a-1111-4222-8333-444455556666")


@pytest.mark.parametrize("value", [12.5, -0.0, 1e300, True, False, 'héllo "q" \n', ""])
def test_values_round_trip_with_their_type(value: object) -> None:
    box = PiiBox("k1")
    where = context(APP, USER, "f")
    sealed = box.seal_value(value, where)
    assert set(sealed) == {SEALED_KEY}
    assert is_sealed(sealed)
    opened = box.open_value(sealed, where)
    assert opened == value
    assert type(opened) is type(value)
    assert json.loads(box.seal_json(value, where)) == sealed


def test_sealing_is_deterministic_per_key_and_place_only() -> None:
    box = PiiBox("k1")
    here = context(APP, USER, "f")
    assert box.seal_value("x", here) == box.seal_value("x", here)
    assert box.seal_value("x", here) != box.seal_value("y", here)
    assert box.seal_value("x", here) != box.seal_value("x", context(APP, uuid.uuid4(), "f"))
    assert box.seal_value("x", here) != PiiBox("k2").seal_value("x", here)


@pytest.mark.parametrize(
    "elsewhere",
    [context("other_app", USER, "f"), context(APP, uuid.uuid4(), "f"), context(APP, USER, "g")],
)
def test_a_value_opens_only_where_it_was_sealed(elsewhere: str) -> None:
    box = PiiBox("k1")
    sealed = box.seal_value("secret", context(APP, USER, "f"))
    with pytest.raises(SecretBoxError):
        box.open_value(sealed, elsewhere)


def test_rotation_opens_old_values_and_reseals_them_with_the_newest_key() -> None:
    where = context(APP, USER, "f")
    old = PiiBox("old").seal_value(42.0, where)
    rotating = PiiBox("new,old")
    assert rotating.rotating
    assert rotating.open_value(old, where) == 42.0
    fresh = rotating.reseal_value(old, where)
    assert fresh is not None
    assert PiiBox("new").open_value(fresh, where) == 42.0
    assert rotating.reseal_value(fresh, where) is None
    with pytest.raises(SecretBoxError):
        PiiBox("new").open_value(old, where)


def test_a_profile_opens_what_it_can_and_leaves_out_what_it_cannot() -> None:
    box = PiiBox("other-key")
    stored = {
        "plain": "p",
        "unreadable": box.seal_value("s", context(APP, USER, "unreadable")),
        "garbage": {SEALED_KEY: "!!not base64!!"},
    }
    # The process's box (the dev key) opens neither sealed value: both are left out.
    assert open_attributes(APP, USER, stored) == {"plain": "p"}


def test_an_empty_key_is_refused_naming_the_setting() -> None:
    with pytest.raises(ValueError, match="TIDINGS_IDENTITY_SECRET_KEY"):
        PiiBox("new,")
