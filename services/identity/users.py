"""Profiles: upsert semantics, update masks, typed custom attributes, aliases, erasure, export.

The rules, in one place (the gRPC layer only translates protobuf to the types here and back):

* **Upsert by any ref.** A ``user_id`` or ``subscription_id`` ref must name an existing user
  (NOT_FOUND otherwise); an ``external_id`` or ``alias`` ref that names nobody creates the user,
  holding that external id or alias.
* **external_id** is set once: writing another value later is FAILED_PRECONDITION
  (``EXTERNAL_ID_IMMUTABLE``); a value another user holds is ALREADY_EXISTS
  (``EXTERNAL_ID_TAKEN``) — two people are never merged by an upsert.
* **Update mask.** Empty: every standard field that is set, and every attribute given (a null
  value removes it). Otherwise exactly the listed paths: a listed standard field left empty is
  cleared, ``attributes`` replaces the whole map, ``attributes.<name>`` sets or (absent from the
  map) removes one attribute.
* **Custom attributes** are typed by the app's customer fields; a value of another type is
  INVALID_ARGUMENT naming ``user.attributes.<name>``. A name with no definition is defined by
  its first value, or refused, per the app's ``undefined_fields`` setting. Numbers can be
  incremented (``increment_attributes``; a missing value counts as 0). Limits: see the
  ``MAX_*`` constants; more than :data:`MAX_ATTRIBUTES` on one user is RESOURCE_EXHAUSTED.
* **Batches** (:func:`upsert_users`) are applied in order: items naming the same user (by
  whatever ref) are folded one after the other, so a later item sees what an earlier one did.
  A bad item fails alone. The whole batch is a few set-based statements in one transaction: the
  rows it touches are read and locked (``FOR UPDATE``, in id order), the new state computed here,
  written back with one INSERT and one UPDATE, and the changes published with one outbox call.
* **Erasure** (:func:`delete_user`) removes the profile, its aliases, subscriptions, merge
  records and events in one transaction and publishes ``KIND_USER_DELETED``; the same external
  id upserted later creates a new, empty profile with a new id.
"""

from __future__ import annotations

import calendar
import hashlib
import math
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from operator import attrgetter
from typing import Generic, TypeVar

import asyncpg
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from tidings.events.v1.identity_change_pb2 import IdentityChange

from services.identity import (
    apps_store,
    changes,
    event_pages,
    events_store,
    pii_fields,
    refs,
    segments,
    users_store,
)
from services.identity.fields import (
    CustomerField,
    FieldCatalog,
    FieldType,
    attribute_name_problem,
    parse_date,
    validate_new_field,
)
from services.identity.refs import ByAlias, ByExternalId, BySubscription, ByUserId, RefKey
from services.identity.users_store import (
    Alias,
    Birthdate,
    JsonScalar,
    ListedUser,
    MergeRecord,
    Profile,
    User,
)
from services.identity.validation import (
    MAX_NAME_LENGTH,
    check_alias,
    check_alias_label,
    external_id_problem,
    normalize_country,
    normalize_email,
    normalize_language,
    normalize_phone,
    normalize_timezone,
    text_problem,
)
from services.runtime.db import DBConnection
from services.runtime.errors import (
    Aborted,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    FieldViolations,
    NotFound,
    ResourceExhausted,
)
from services.runtime.paging import (
    bad_page_token,
    decode_page_token,
    encode_page_token,
    page_size,
)

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_ALIASES",
    "MAX_ATTRIBUTES",
    "MAX_BATCH_SIZE",
    "MAX_PAGE_SIZE",
    "MAX_STRING_ATTRIBUTE_LENGTH",
    "STANDARD_FIELDS",
    "AttributeValue",
    "BatchPlan",
    "Export",
    "InvalidValue",
    "RawValue",
    "UpsertRequest",
    "Upserted",
    "UserFields",
    "UserWrite",
    "add_alias",
    "apply_write",
    "changed_fields",
    "create_customer_field",
    "decode_page_token",
    "delete_user",
    "encode_page_token",
    "export_user",
    "get_user",
    "get_users",
    "list_customer_fields",
    "list_user_ids",
    "list_users",
    "prepare_write",
    "remove_alias",
    "typed_attributes",
    "upsert_users",
]

#: Most items in one BatchUpsertUsers or BatchGetUsers call.
MAX_BATCH_SIZE = 1_000
#: Most custom attributes one user may hold.
MAX_ATTRIBUTES = 100
#: Longest string attribute value, in characters.
MAX_STRING_ATTRIBUTE_LENGTH = 1_000
#: Most aliases one user may hold.
MAX_ALIASES = 10
#: Page size of List methods when the caller gives none.
DEFAULT_PAGE_SIZE = 100
#: Largest page of List methods; larger requests are served this many (AIP-158).
MAX_PAGE_SIZE = 1_000
#: How often a batch is retried when a concurrent transaction won a race on one of its keys
#: (created the same external id, took the same alias, deleted a user being updated).
_ATTEMPTS = 3

#: The standard attributes, in the order of the ``User`` message.
STANDARD_FIELDS = (
    "first_name",
    "last_name",
    "email",
    "phone",
    "birthdate",
    "timezone",
    "language",
    "country",
)
_TEXT_FIELDS = ("first_name", "last_name")
_OUTPUT_ONLY = frozenset({"user_id", "subscriptions", "counts", "create_time", "update_time"})

#: A typed custom attribute value.
AttributeValue = str | float | bool | datetime


@dataclass(frozen=True, slots=True)
class InvalidValue:
    """A value the request could not express (an attribute with no kind set, a bad time)."""

    problem: str


#: An attribute value as a request gives it: a value, None (remove it) or an invalid one.
RawValue = AttributeValue | None | InvalidValue


# The per-item types of a batch are plain (not frozen) dataclasses: a frozen one's __init__
# costs a few microseconds more, paid a thousand times per BatchUpsertUsers call.
@dataclass(slots=True)
class UserFields:
    """The ``user`` of an upsert request as given: empty strings are "not set".

    Attributes:
        birthdate: ``(year, month, day)`` of a ``google.type.Date``, None when absent.
        attributes: Custom attributes by name.
        has_aliases: Whether the request listed aliases (managed by AddAlias, refused here).
    """

    external_id: str = ""
    first_name: str = ""
    last_name: str = ""
    email: str = ""
    phone: str = ""
    birthdate: tuple[int, int, int] | None = None
    timezone: str = ""
    language: str = ""
    country: str = ""
    attributes: Mapping[str, RawValue] = field(default_factory=dict)
    has_aliases: bool = False


@dataclass(slots=True)
class UpsertRequest:
    """One upsert, translated from the request.

    Attributes:
        ref: Which user; None if the ref was malformed (``violations`` says why).
        user: The values.
        update_mask: The mask's paths.
        increments: Numeric attributes to add to.
        violations: Problems found while translating the request; more are added by
            :func:`prepare_write`.
        prefix: Path prefix of the fields of this request in its call (``""`` for UpsertUser,
            ``"requests[3]."`` in a batch).
    """

    ref: RefKey | None
    user: UserFields
    update_mask: Sequence[str] = ()
    increments: Mapping[str, float] = field(default_factory=dict)
    violations: FieldViolations = field(default_factory=FieldViolations)
    prefix: str = ""


@dataclass(slots=True)
class UserWrite:
    """A checked upsert: what to change on the user ``ref`` names.

    Attributes:
        ref: Which user.
        external_id: External id to set, or None to leave it.
        standard: New values of standard fields by name; None clears a field.
        attributes: New attribute values by name; None removes one.
        replace_attributes: Whether ``attributes`` replaces the whole map.
        increments: Amounts to add to numeric attributes.
        prefix: Path prefix for the errors found later.
    """

    ref: RefKey
    external_id: str | None = None
    standard: Mapping[str, str | Birthdate | None] = field(default_factory=dict)
    attributes: Mapping[str, AttributeValue | None] = field(default_factory=dict)
    replace_attributes: bool = False
    increments: Mapping[str, float] = field(default_factory=dict)
    prefix: str = ""


@dataclass(slots=True)
class Upserted:
    """The outcome of one successful upsert.

    Attributes:
        profile: The user after the batch.
        created: Whether this item created the user.
        timestamp_attributes: Which attribute names hold timestamps.
        user: The whole profile (aliases, subscriptions, counts) when asked for.
    """

    profile: Profile
    created: bool
    timestamp_attributes: frozenset[str]
    user: User | None = None


# -- checking a request --------------------------------------------------------------------------


def _birthdate(
    raw: tuple[int, int, int], path: str, today: date, v: FieldViolations
) -> Birthdate | None:
    year, month, day = raw
    if not 1 <= month <= 12:
        v.add(path, "month must be 1-12", reason="INVALID_DATE")
        return None
    if not 0 <= year <= 9999:
        v.add(path, "year must be 1-9999, or 0 when unknown", reason="INVALID_DATE")
        return None
    # An unknown year allows February 29: leap years have it.
    last_day = calendar.monthrange(year or 2000, month)[1]
    if not 1 <= day <= last_day:
        v.add(path, f"day must be 1-{last_day} for month {month}", reason="INVALID_DATE")
        return None
    if year and date(year, month, day) > today:
        v.add(path, "must not be in the future", reason="INVALID_DATE")
        return None
    return Birthdate(month=month, day=day, year=year or None)


def _standard_value(
    name: str, user: UserFields, prefix: str, today: date, v: FieldViolations
) -> str | Birthdate | None:
    """The checked, normalised value of standard field ``name``; None clears it.

    Its field path is ``prefix`` + ``name``, built only for a violation (this runs for every
    field of every item of a batch).
    """
    if name == "birthdate":
        return _birthdate(user.birthdate, prefix + name, today, v) if user.birthdate else None
    text: str = getattr(user, name)
    if not text:
        return None
    if name in _TEXT_FIELDS:
        problem = text_problem(text, max_length=MAX_NAME_LENGTH)
        if problem is not None:
            v.add(prefix + name, problem, reason="INVALID_TEXT")
        return text
    # What validation.check_email and its siblings do, with the path built only on failure.
    normalize, reason = _NORMALIZERS[name]
    try:
        return normalize(text)
    except ValueError as exc:
        v.add(prefix + name, str(exc), reason=reason)
        return None


#: The normaliser of each standard text field other than the names, and the reason of its
#: violation (as :mod:`~services.identity.validation`'s ``check_*`` functions record them).
_NORMALIZERS: dict[str, tuple[Callable[[str], str], str]] = {
    "email": (normalize_email, "INVALID_EMAIL"),
    "phone": (normalize_phone, "INVALID_PHONE"),
    "timezone": (normalize_timezone, "INVALID_TIMEZONE"),
    "language": (normalize_language, "INVALID_LANGUAGE"),
    "country": (normalize_country, "INVALID_COUNTRY"),
}


def _attribute_value(
    value: RawValue, prefix: str, name: str, v: FieldViolations
) -> AttributeValue | None:
    """The checked value; None (and a violation for ``prefix`` + ``name``) when it is not
    acceptable."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
    elif isinstance(value, bool | datetime):
        return value
    elif isinstance(value, InvalidValue):
        v.add(prefix + name, value.problem, reason="INVALID_ATTRIBUTE_VALUE")
        return None
    problem: str | None = None
    if isinstance(value, str):
        # Line breaks and tabs are fine inside a string attribute; other control characters
        # (NUL above all, which PostgreSQL cannot store) are not.
        problem = text_problem(
            value.replace("\n", " ").replace("\r", " ").replace("\t", " "),
            max_length=MAX_STRING_ATTRIBUTE_LENGTH,
        )
    elif isinstance(value, float) and not math.isfinite(value):
        problem = "numbers must be finite"
    if problem is not None:
        v.add(prefix + name, problem, reason="INVALID_ATTRIBUTE_VALUE")
        return None
    return value


def prepare_write(request: UpsertRequest, *, today: date) -> UserWrite:
    """Check an upsert request and work out, from its mask, what it writes.

    Everything that can be checked without the database is checked here, and every problem is
    reported at once.

    Args:
        request: The translated request.
        today: The current date (birthdates must not be in the future).

    Returns:
        The write.

    Raises:
        InvalidArgument: Naming every bad field (``user.email``, ``update_mask``,
            ``user.attributes.plan``, ``increment_attributes.visits``, ...).
    """
    v, p, user = request.violations, request.prefix, request.user
    standard: dict[str, str | Birthdate | None] = {}
    attributes: dict[str, RawValue] = {}
    replace_attributes = False
    external_id: str | None = None

    if user.has_aliases:
        v.add(f"{p}user.aliases", "aliases are managed with AddAlias and RemoveAlias")

    if request.update_mask:
        for path in dict.fromkeys(request.update_mask):
            head, _, rest = path.partition(".")
            if path in STANDARD_FIELDS:
                standard[path] = _standard_value(path, user, f"{p}user.", today, v)
            elif path == "external_id":
                if not user.external_id:
                    v.add(f"{p}user.external_id", "an external id cannot be removed")
                external_id = user.external_id
            elif path == "attributes":
                replace_attributes = True
                attributes.update(user.attributes)
            elif head == "attributes" and rest:
                attributes[rest] = user.attributes.get(rest)
            elif path in _OUTPUT_ONLY or head in _OUTPUT_ONLY:
                v.add(f"{p}update_mask", f"{path!r} is output only", reason="OUTPUT_ONLY_FIELD")
            elif head == "aliases":
                v.add(f"{p}update_mask", "aliases are managed with AddAlias and RemoveAlias")
            else:
                v.add(f"{p}update_mask", f"unknown field path {path!r}", reason="UNKNOWN_FIELD")
    else:
        user_prefix = f"{p}user."
        for name in STANDARD_FIELDS:
            if getattr(user, name):
                standard[name] = _standard_value(name, user, user_prefix, today, v)
        external_id = user.external_id or None
        attributes.update(user.attributes)

    if external_id:
        problem = external_id_problem(external_id)
        if problem is not None:
            v.add(f"{p}user.external_id", problem, reason="INVALID_ID")
        if isinstance(request.ref, ByExternalId) and request.ref.external_id != external_id:
            v.add(f"{p}user.external_id", "must match ref.external_id", reason="REF_MISMATCH")

    checked: dict[str, AttributeValue | None] = {}
    attributes_prefix = f"{p}user.attributes."
    for name, raw in attributes.items():
        problem = attribute_name_problem(name)
        if problem is not None:
            v.add(attributes_prefix + name, problem, reason="INVALID_ATTRIBUTE_NAME")
        elif raw is not None:
            checked[name] = _attribute_value(raw, attributes_prefix, name, v)
        else:
            checked[name] = None
    if replace_attributes:
        # Replacing the map with nulls in it: the nulls are simply absent afterwards.
        checked = {name: value for name, value in checked.items() if value is not None}

    for name, amount in request.increments.items():
        path = f"{p}increment_attributes.{name}"
        problem = attribute_name_problem(name)
        if problem is not None:
            v.add(path, problem, reason="INVALID_ATTRIBUTE_NAME")
        elif not math.isfinite(amount):
            v.add(path, "must be a finite number", reason="INVALID_ATTRIBUTE_VALUE")
        elif name in checked:
            v.add(path, "an attribute cannot be both set and incremented in one write")

    v.raise_if_any()
    assert request.ref is not None  # a malformed ref recorded a violation
    return UserWrite(
        ref=request.ref,
        external_id=external_id,
        standard=standard,
        attributes=checked,
        replace_attributes=replace_attributes,
        increments=dict(request.increments),
        prefix=p,
    )


# -- applying a write ----------------------------------------------------------------------------


#: The field type of a value, by its exact type (the common case; subclasses take _type_of).
_TYPE_OF: dict[type, FieldType] = {
    str: FieldType.STRING,
    float: FieldType.NUMBER,
    int: FieldType.NUMBER,
    bool: FieldType.BOOL,
    datetime: FieldType.TIMESTAMP,
}


def _type_of(value: AttributeValue) -> FieldType:
    known = _TYPE_OF.get(type(value))
    if known is not None:
        return known
    # bool first: in Python a bool is also an int.
    if isinstance(value, bool):
        return FieldType.BOOL
    if isinstance(value, float | int):
        return FieldType.NUMBER
    if isinstance(value, datetime):
        return FieldType.TIMESTAMP
    return FieldType.STRING


def _stored(value: AttributeValue) -> JsonScalar:
    kind = type(value)
    if kind is str or kind is float or kind is bool:
        return value  # type: ignore[return-value]  # narrowed by the exact type
    if isinstance(value, datetime):
        return users_store.format_timestamp(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _check_type(
    name: str,
    wanted: FieldType,
    path_prefix: str,
    catalog: FieldCatalog,
    proposed: dict[str, CustomerField],
    v: FieldViolations,
) -> None:
    """Check ``name`` may hold a ``wanted`` value; its field path is ``path_prefix`` + name
    (built only for a violation: this runs for every attribute of every item)."""
    defined = catalog.type_of(name) or (proposed[name].type if name in proposed else None)
    if defined is wanted:
        return
    path = f"{path_prefix}{name}"
    if defined is None:
        if catalog.auto_define:
            proposed[name] = CustomerField(name=name, type=wanted, auto_defined=True)
        else:
            v.add(
                path,
                f"{name!r} is not a defined customer field (the app refuses undefined fields)",
                reason="UNDEFINED_FIELD",
            )
    elif defined is not wanted:
        hint = " (a string_value 'YYYY-MM-DD')" if defined is FieldType.DATE else ""
        v.add(
            path,
            f"{name!r} is a {defined.value} field{hint}; got a {wanted.value}",
            reason="FIELD_TYPE_MISMATCH",
        )


def _check_date(name: str, value: str, path_prefix: str, v: FieldViolations) -> None:
    """Check the value of a date field: a ``string_value`` 'YYYY-MM-DD', stored as given (the
    one spelling :func:`fields.parse_date` takes)."""
    try:
        parse_date(value)
    except ValueError as error:
        v.add(
            f"{path_prefix}{name}",
            f"{name!r} is a date field: {error}",
            reason="INVALID_DATE",
        )


def apply_write(
    profile: Profile, write: UserWrite, catalog: FieldCatalog
) -> tuple[Profile, list[CustomerField]]:
    """The profile after ``write``, and the fields the write would auto-define.

    Pure: ``profile`` is not changed. Uniqueness of the external id across users is the
    caller's to check (it needs the other users).

    Args:
        profile: The user before the write.
        write: The checked write.
        catalog: The definitions to check attributes against.

    Returns:
        The new state, and the definitions to add to ``catalog`` if the write is kept.

    Raises:
        FailedPrecondition: ``EXTERNAL_ID_IMMUTABLE`` when changing a set external id.
        InvalidArgument: ``user.attributes.<name>`` of the wrong type or undefined.
        ResourceExhausted: ``ATTRIBUTE_LIMIT`` when the user would hold too many attributes.
    """
    p = write.prefix
    if write.external_id is not None and profile.external_id not in (None, write.external_id):
        raise FailedPrecondition(
            "a user's external_id cannot change once set",
            reason="EXTERNAL_ID_IMMUTABLE",
            field_violations=_violation(
                f"{p}user.external_id", f"the user's external_id is {profile.external_id!r}"
            ),
        )
    v = FieldViolations()
    proposed: dict[str, CustomerField] = {}
    attributes_path = f"{p}user.attributes."
    attributes: dict[str, JsonScalar] = {} if write.replace_attributes else dict(profile.attributes)
    type_of = catalog.type_of
    for name, value in write.attributes.items():
        if value is None:
            attributes.pop(name, None)
            continue
        wanted = _type_of(value)
        defined = type_of(name)
        if defined is FieldType.DATE and isinstance(value, str):
            _check_date(name, value, attributes_path, v)
        elif defined is not wanted:  # the common case (defined, same type) needs no call
            _check_type(name, wanted, attributes_path, catalog, proposed, v)
        attributes[name] = _stored(value)
    for name, amount in write.increments.items():
        path = f"{p}increment_attributes.{name}"
        _check_type(name, FieldType.NUMBER, f"{p}increment_attributes.", catalog, proposed, v)
        current = attributes.get(name, 0.0)
        if isinstance(current, bool) or not isinstance(current, float | int):
            v.add(path, f"{name!r} does not hold a number", reason="FIELD_TYPE_MISMATCH")
            continue
        total = float(current) + amount
        if not math.isfinite(total):
            v.add(path, "the result would not be a finite number", reason="NUMBER_OVERFLOW")
            continue
        attributes[name] = total
    v.raise_if_any()
    if len(attributes) > MAX_ATTRIBUTES and len(attributes) > len(profile.attributes):
        raise ResourceExhausted(
            f"a user may hold at most {MAX_ATTRIBUTES} custom attributes",
            reason="ATTRIBUTE_LIMIT",
            field_violations=_violation(
                f"{p}user.attributes", f"would hold {len(attributes)} attributes"
            ),
            metadata={"limit": str(MAX_ATTRIBUTES)},
        )
    new = _with_attributes(profile, attributes)
    if write.external_id is not None:
        new.external_id = write.external_id
    for name, standard_value in write.standard.items():
        setattr(new, name, standard_value)
    return new, list(proposed.values())


def _with_attributes(profile: Profile, attributes: dict[str, JsonScalar]) -> Profile:
    """A copy of ``profile`` holding ``attributes`` (``dataclasses.replace`` costs several
    times more, paid per item of a batch)."""
    return Profile(
        profile.user_id,
        profile.create_time,
        profile.update_time,
        profile.external_id,
        profile.first_name,
        profile.last_name,
        profile.email,
        profile.phone,
        profile.birthdate,
        profile.timezone,
        profile.language,
        profile.country,
        attributes,
    )


def _violation(field_path: str, description: str) -> tuple[FieldViolation, ...]:
    """A one-item violation list, for errors other than InvalidArgument that name a field."""
    return (FieldViolation(field_path, description),)


def changed_fields(before: Profile | None, after: Profile) -> list[str]:
    """The names of the fields that differ (``first_name``, ``attributes.plan``...).

    For a new profile (``before`` None), the fields it was created with.
    """
    if before is None:
        # Against an empty profile: whatever is set (attribute values are never None).
        names = [name for name in _COMPARED_NAMES if getattr(after, name) is not None]
        names.extend(f"attributes.{name}" for name in sorted(after.attributes))
        return names
    old = before
    names = (
        []
        if _COMPARED(old) == _COMPARED(after)
        else [name for name in _COMPARED_NAMES if getattr(old, name) != getattr(after, name)]
    )
    for name in sorted(old.attributes.keys() | after.attributes.keys()):
        mine, theirs = old.attributes.get(name), after.attributes.get(name)
        # 1 and True compare equal in Python; a type change is a change.
        if mine != theirs or type(mine) is not type(theirs):
            names.append(f"attributes.{name}")
    return names


#: The profile's own fields :func:`changed_fields` compares, and a getter of all of them.
_COMPARED_NAMES = ("external_id", *STANDARD_FIELDS)
_COMPARED = attrgetter(*_COMPARED_NAMES)


# -- a batch -------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Target:
    before: Profile | None  # None: created by this batch
    profile: Profile
    created_by: int | None = None
    alias: Alias | None = None


class _Conflict(Exception):
    """A concurrent transaction won a race on a key of the batch; run the batch again."""


class BatchPlan:
    """Folds a batch of writes, in order, onto the users they name.

    Built from what the database said when the batch started: which refs name whom, the locked
    rows of those users, and the customer-field definitions. :meth:`apply` runs one item;
    :meth:`finish` gives what to write.

    Args:
        resolved: User ids of the refs (and external ids written) that name someone.
        profiles: Locked rows of those users.
        catalog: Definitions to check attributes against.
        new_ids: Source of ids for users the batch creates.
    """

    def __init__(
        self,
        resolved: Mapping[RefKey, uuid.UUID],
        profiles: Mapping[uuid.UUID, Profile],
        catalog: FieldCatalog,
        new_ids: Iterator[uuid.UUID],
        at: datetime,
    ) -> None:
        self._resolved = resolved
        self._catalog = catalog
        self._new_ids = new_ids
        self._at = at
        self._targets: dict[uuid.UUID, _Target] = {
            user_id: _Target(before=profile, profile=profile)
            for user_id, profile in profiles.items()
        }
        # Who holds which external id / alias as the batch goes (creations add to them).
        self._by_external_id: dict[str, uuid.UUID] = {
            key.external_id: user_id
            for key, user_id in resolved.items()
            if isinstance(key, ByExternalId)
        }
        self._by_alias: dict[tuple[str, str], uuid.UUID] = {
            (key.label, key.value): user_id
            for key, user_id in resolved.items()
            if isinstance(key, ByAlias)
        }

    def _existing(self, key: RefKey) -> uuid.UUID | None:
        if isinstance(key, ByExternalId):
            return self._by_external_id.get(key.external_id)
        if isinstance(key, ByAlias):
            return self._by_alias.get((key.label, key.value))
        return self._resolved.get(key)

    def apply(self, index: int, write: UserWrite) -> tuple[uuid.UUID, bool]:
        """Apply item ``index`` of the batch.

        Returns:
            The user's id, and whether this item created it.

        Raises:
            DomainError: Why the item fails; the plan is then as if it was not in the batch.
        """
        user_id = self._existing(write.ref)
        if user_id is None:
            if not isinstance(write.ref, ByExternalId | ByAlias):
                raise refs.user_not_found(write.ref)
            user_id = next(self._new_ids)
            empty = Profile(user_id=user_id, create_time=self._at, update_time=self._at)
            if isinstance(write.ref, ByExternalId):
                empty.external_id = write.ref.external_id
            alias = (
                Alias(write.ref.label, write.ref.value) if isinstance(write.ref, ByAlias) else None
            )
            target = _Target(before=None, profile=empty, created_by=index, alias=alias)
        else:
            existing = self._targets.get(user_id)
            if existing is None:
                raise _Conflict  # resolved, then gone before it was locked: deleted meanwhile
            target = existing
        new, definitions = apply_write(target.profile, write, self._catalog)
        if new.external_id is not None and new.external_id != target.profile.external_id:
            holder = self._by_external_id.get(new.external_id)
            if holder is not None and holder != user_id:
                raise AlreadyExists(
                    "another user has this external_id",
                    reason="EXTERNAL_ID_TAKEN",
                    field_violations=_violation(
                        f"{write.prefix}user.external_id", "held by another user"
                    ),
                )
        # The item succeeded: keep its effects.
        self._catalog.define(definitions)
        target.profile = new
        self._targets[user_id] = target
        if new.external_id is not None:
            self._by_external_id[new.external_id] = user_id
        if target.alias is not None:
            self._by_alias[(target.alias.label, target.alias.value)] = user_id
        return user_id, target.created_by == index

    def profile(self, user_id: uuid.UUID) -> Profile:
        """The current state of a user of the batch."""
        return self._targets[user_id].profile

    def finish(
        self, app_id: str
    ) -> tuple[list[Profile], list[Profile], list[tuple[uuid.UUID, Alias]], list[IdentityChange]]:
        """What to write: new profiles, changed profiles, new aliases, and the change facts.

        Profiles that end the batch as they started are not written (and publish nothing).
        """
        created: list[Profile] = []
        updated: list[Profile] = []
        aliases: list[tuple[uuid.UUID, Alias]] = []
        facts: list[IdentityChange] = []
        # Built here rather than with changes.change(): the same facts, a few microseconds
        # cheaper each, which a 1,000-user batch feels (one timestamp, ids from one read of
        # the OS's random source).
        occurred_at = Timestamp()
        occurred_at.FromDatetime(self._at)
        event_ids = _event_ids(len(self._targets))
        template = IdentityChange(app_id=app_id, occurred_at=occurred_at)
        for user_id, target in self._targets.items():
            names = changed_fields(target.before, target.profile)
            if target.before is None:
                created.append(target.profile)
                if target.alias is not None:
                    aliases.append((user_id, target.alias))
                kind = changes.Kind.KIND_USER_CREATED
            elif names:
                target.profile.update_time = self._at
                updated.append(target.profile)
                kind = changes.Kind.KIND_USER_UPDATED
            else:
                continue
            # From a template holding the fields every fact of the batch shares: cheaper than
            # the keyword constructor, which copies the timestamp message each time.
            fact = IdentityChange()
            fact.CopyFrom(template)
            fact.event_id = next(event_ids)
            fact.user_id = str(user_id)
            fact.kind = kind
            if target.profile.external_id:
                fact.external_id = target.profile.external_id
            fact.changed_fields.extend(sorted(names))
            facts.append(fact)
        # A fixed order of inserts: two batches creating the same keys wait on each other
        # instead of deadlocking.
        created.sort(key=lambda p: (p.external_id or "", p.user_id))
        aliases.sort(key=lambda item: (item[1].label, item[1].value))
        return created, updated, aliases, facts


def _event_ids(count: int) -> Iterator[str]:
    """``count`` random (version 4) UUIDs as text, for the event ids of change facts."""
    raw = bytearray(os.urandom(16 * count))
    for offset in range(0, len(raw), 16):
        raw[offset + 6] = (raw[offset + 6] & 0x0F) | 0x40  # version 4
        raw[offset + 8] = (raw[offset + 8] & 0x3F) | 0x80  # RFC 4122 variant
        h = raw[offset : offset + 16].hex()
        yield f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _keys_of(writes: Sequence[UserWrite | DomainError]) -> list[RefKey]:
    keys: list[RefKey] = []
    for write in writes:
        if isinstance(write, UserWrite):
            ref = write.ref
            keys.append(ref)
            # An external_id ref already names the id written (prepare_write checked they match).
            if write.external_id is not None and not isinstance(ref, ByExternalId):
                keys.append(ByExternalId(write.external_id))
    return keys


def _attribute_names(
    writes: Sequence[UserWrite | DomainError], profiles: Mapping[uuid.UUID, Profile]
) -> tuple[set[str], set[str]]:
    """Names written by the batch, and every name it may need the type of."""
    written: set[str] = set()
    for write in writes:
        if isinstance(write, UserWrite):
            written.update(write.attributes, write.increments)
    held = {name for profile in profiles.values() for name in profile.attributes}
    return written, written | held


async def _upsert_once(
    conn: DBConnection,
    app_id: str,
    writes: Sequence[UserWrite | DomainError],
    at: datetime,
    with_users: bool,
) -> list[Upserted | DomainError]:
    found = await refs.lookup(conn, app_id, _keys_of(writes))
    profiles = await users_store.lock_profiles(conn, app_id, set(found.values()))
    if len(profiles) < len(set(found.values())):
        raise _Conflict  # a user was deleted or merged away between the lookup and the lock
    written, names = _attribute_names(writes, profiles)
    defined = await users_store.customer_fields(conn, app_id, names) if names else {}
    auto_define = True
    if written - defined.keys():
        settings = await apps_store.get_app_settings(conn, app_id)
        auto_define = settings.undefined_fields != "reject"
    catalog = FieldCatalog(defined, auto_define=auto_define)
    plan = BatchPlan(found, profiles, catalog, iter(users_store.new_user_ids(len(writes))), at)
    applied: list[tuple[uuid.UUID, bool] | DomainError] = []
    for index, write in enumerate(writes):
        if isinstance(write, DomainError):
            applied.append(write)
            continue
        try:
            applied.append(plan.apply(index, write))
        except DomainError as error:
            applied.append(error)

    created, updated, aliases, facts = plan.finish(app_id)
    # Values of PII fields are sealed as they are written (auto-definitions never are PII).
    sealed = frozenset(name for name, definition in defined.items() if definition.pii)
    inserted = await users_store.insert_profiles(conn, app_id, created, at, sealed=sealed)
    if len(inserted) < len(created):
        raise _Conflict  # someone created one of these external ids meanwhile
    if await users_store.insert_aliases(conn, app_id, aliases, at) < len(aliases):
        raise _Conflict  # someone took one of these aliases meanwhile
    new_fields = catalog.new_definitions()
    if len(await users_store.insert_auto_fields(conn, app_id, new_fields, at)) < len(new_fields):
        raise _Conflict  # someone defined one of these fields meanwhile (maybe another type)
    await users_store.update_profiles(conn, app_id, updated, at, sealed=sealed)
    await changes.publish(conn, facts)

    full: Mapping[uuid.UUID, User] = {}
    if with_users:
        ids = {item[0] for item in applied if not isinstance(item, DomainError)}
        full = await users_store.load_users(conn, app_id, list(ids))
    timestamps = catalog.timestamp_names()
    results: list[Upserted | DomainError] = []
    for item in applied:
        if isinstance(item, DomainError):
            results.append(item)
        else:
            user_id, was_created = item
            results.append(
                Upserted(
                    profile=plan.profile(user_id),
                    created=was_created,
                    timestamp_attributes=timestamps,
                    user=full.get(user_id),
                )
            )
    return results


async def upsert_users(
    conn: DBConnection,
    app_id: str,
    requests: Sequence[UpsertRequest],
    *,
    at: datetime,
    with_users: bool = False,
) -> list[Upserted | DomainError]:
    """Upsert a batch of users, in order, with one result per request.

    Runs in its own transaction (retried if a concurrent transaction wins a race on one of the
    batch's keys). Items naming the same user are applied one after the other; every result of
    such items shows the user after the whole batch. Facts: one ``KIND_USER_CREATED`` per new
    user and one ``KIND_USER_UPDATED`` (with its changed fields) per user that changed, in one
    outbox statement.

    Args:
        conn: A connection not in a transaction.
        app_id: The caller's app.
        requests: At most :data:`MAX_BATCH_SIZE` requests.
        at: The time of the write (``create_time``/``update_time``).
        with_users: Also load each user's whole profile (for UpsertUser).

    Returns:
        Per request, its outcome or the error that failed it (INVALID_ARGUMENT, NOT_FOUND,
        FAILED_PRECONDITION, ALREADY_EXISTS, RESOURCE_EXHAUSTED).

    Raises:
        InvalidArgument: ``requests`` when there are more than :data:`MAX_BATCH_SIZE`.
        Aborted: When concurrent writers kept winning races on the batch's keys.
    """
    if len(requests) > MAX_BATCH_SIZE:
        _too_many("requests", len(requests))
    today = at.astimezone(UTC).date()
    writes: list[UserWrite | DomainError] = []
    for request in requests:
        try:
            writes.append(prepare_write(request, today=today))
        except DomainError as error:
            writes.append(error)
    if all(isinstance(write, DomainError) for write in writes):
        return list(writes)  # type: ignore[arg-type]  # every item is an error
    for _ in range(_ATTEMPTS):
        try:
            async with conn.transaction():
                return await _upsert_once(conn, app_id, writes, at, with_users)
        except (_Conflict, asyncpg.DeadlockDetectedError, asyncpg.UniqueViolationError):
            continue
    raise Aborted(
        "the batch kept conflicting with concurrent writes to the same users; retry it",
        reason="CONCURRENT_MODIFICATION",
    )


def _too_many(field_path: str, count: int) -> None:
    violations = FieldViolations()
    violations.add(field_path, f"at most {MAX_BATCH_SIZE} items per call, got {count}")
    violations.raise_if_any(reason="BATCH_TOO_LARGE")


# -- reading -------------------------------------------------------------------------------------


def typed_attributes(
    attributes: Mapping[str, JsonScalar], timestamp_names: frozenset[str]
) -> dict[str, AttributeValue]:
    """Stored attribute values as typed values (timestamps parsed back)."""
    typed: dict[str, AttributeValue] = {}
    for name, value in attributes.items():
        if name in timestamp_names and isinstance(value, str):
            try:
                typed[name] = users_store.parse_timestamp(value)
                continue
            except ValueError:
                pass  # not a time after all: show what is stored rather than fail the read
        typed[name] = value
    return typed


async def get_user(conn: DBConnection, app_id: str, key: RefKey) -> User:
    """The whole profile ``key`` names: what :func:`get_users` answers for one ref, in one query.

    Raises:
        NotFound: ``USER_NOT_FOUND`` if the ref names nobody in the app.
    """
    values: tuple[object, ...]
    if isinstance(key, ByUserId):
        values = (key.user_id,)
    elif isinstance(key, ByExternalId):
        values = (key.external_id,)
    elif isinstance(key, ByAlias):
        values = (key.label, key.value)
    else:
        values = (key.subscription_id,)
    user = await users_store.load_user_by(conn, app_id, _REF_KINDS[type(key)], *values)
    if user is None:
        raise refs.user_not_found(key)
    return user


#: The store's name for each kind of reference.
_REF_KINDS: dict[type, users_store.RefKind] = {
    ByUserId: "user_id",
    ByExternalId: "external_id",
    ByAlias: "alias",
    BySubscription: "subscription_id",
}


async def get_users(
    conn: DBConnection, app_id: str, keys: Sequence[RefKey | DomainError]
) -> list[User | DomainError]:
    """Whole profiles for refs, one result per ref in order (NOT_FOUND for unknown refs).

    Raises:
        InvalidArgument: ``refs`` when there are more than :data:`MAX_BATCH_SIZE`.
    """
    if len(keys) > MAX_BATCH_SIZE:
        _too_many("refs", len(keys))
    valid = [key for key in keys if not isinstance(key, DomainError)]
    found = await refs.lookup(conn, app_id, valid) if valid else {}
    users = await users_store.load_users(conn, app_id, list(set(found.values())))
    results: list[User | DomainError] = []
    for key in keys:
        if isinstance(key, DomainError):
            results.append(key)
            continue
        user_id = found.get(key)
        user = users.get(user_id) if user_id is not None else None
        results.append(user if user is not None else refs.user_not_found(key))
    return results


def _page_size(requested: int) -> int:
    """The page size to serve: the default for 0, at most :data:`MAX_PAGE_SIZE`."""
    return page_size(requested, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)


async def list_users(
    conn: DBConnection, app_id: str, *, size: int, token: str
) -> tuple[list[User], str]:
    """One page of an app's users, oldest first, without subscriptions.

    Returns:
        The users and the next page's token ("" on the last page).

    Raises:
        InvalidArgument: ``page_size`` negative or ``page_token`` not ours.
    """
    page, next_token = await list_user_ids(conn, app_id, size=size, token=token)
    users = await users_store.load_users(
        conn, app_id, [u.user_id for u in page], with_subscriptions=False
    )
    return [users[u.user_id] for u in page if u.user_id in users], next_token


async def list_user_ids(
    conn: DBConnection, app_id: str, *, size: int, token: str
) -> tuple[list[ListedUser], str]:
    """:func:`list_users` with only each user's ids (no profile is loaded). The page token is
    the same in both, so a walk may switch between them."""
    limit = _page_size(size)
    after = None
    if token:
        position = decode_page_token("users", token)
        try:
            after = (datetime.fromisoformat(position["t"]), uuid.UUID(position["u"]))
        except (KeyError, ValueError):
            raise bad_page_token() from None
    listed = await users_store.list_user_ids(conn, app_id, after=after, limit=limit + 1)
    page = listed[:limit]
    next_token = ""
    if len(listed) > limit and page:
        next_token = encode_page_token(
            "users", {"t": page[-1].create_time.isoformat(), "u": str(page[-1].user_id)}
        )
    return page, next_token


# -- erasure and export --------------------------------------------------------------------------


async def delete_user(conn: DBConnection, app_id: str, key: RefKey, *, at: datetime) -> uuid.UUID:
    """Erase a user (GDPR): profile, aliases, subscriptions, merge records and events.

    One transaction, which also publishes ``KIND_USER_DELETED`` (with the external id, so
    services that keyed data by it can purge too).

    Returns:
        The erased user's id.

    Raises:
        NotFound: ``USER_NOT_FOUND``.
    """
    async with conn.transaction():
        # Lock the row before erasing events: the events consumer locks the users it stores
        # events for, so nothing of this user can be stored after our delete commits.
        profile = await _lock_ref(conn, app_id, key)
        if profile is None:
            raise refs.user_not_found(key)
        user_id = profile.user_id
        await events_store.delete_for_user(conn, app_id, user_id)
        await users_store.delete_user(conn, app_id, user_id)
        await changes.publish(
            conn,
            [
                changes.change(
                    changes.Kind.KIND_USER_DELETED,
                    app_id=app_id,
                    user_id=user_id,
                    at=at,
                    external_id=profile.external_id,
                )
            ],
        )
    return user_id


#: Most events on one page of ExportUser (pages are bounded by bytes too, see event_pages).
EXPORT_PAGE_EVENTS = 5_000

_M = TypeVar("_M", bound=Message)


@dataclass(frozen=True, slots=True)
class Export(Generic[_M]):
    """One answer of a GDPR access export.

    Attributes:
        user: The profile; ``None`` on the answers to an events page token.
        events: A page of the user's events (as answered), oldest first.
        merges: The merges into the profile; empty on the answers to an events page token.
        next_events_page_token: Token of the next page of events; empty after the last.
    """

    user: User | None
    events: list[_M]
    merges: list[MergeRecord]
    next_events_page_token: str


def _export_list(app_id: str, user_id: uuid.UUID) -> str:
    # A token of one user's export is refused for another user's.
    digest = hashlib.sha256(f"{app_id}\x1f{user_id}".encode()).hexdigest()[:16]
    return f"export/{digest}"


async def export_user(
    conn: DBConnection,
    app_id: str,
    key: RefKey,
    render: Callable[[events_store.Event], _M],
    *,
    events_page_token: str = "",
) -> Export[_M]:
    """Everything held about a user, with the events paged (each answer one snapshot).

    The first answer has the profile, the merges and the first page of events; an
    ``events_page_token`` asks for the next page of events only. A page stops at
    :data:`EXPORT_PAGE_EVENTS` events or :data:`~services.identity.event_pages.MAX_PAGE_BYTES`
    of rendered ones, so every answer fits a client's default 4 MB limit.

    Raises:
        NotFound: ``USER_NOT_FOUND``.
        InvalidArgument: ``events_page_token`` is not from an export of this user.
    """
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        user_id = (await refs.lookup(conn, app_id, [key])).get(key)
        if user_id is None:
            raise refs.user_not_found(key)
        list_name = _export_list(app_id, user_id)
        user: User | None = None
        merges: list[MergeRecord] = []
        after = None
        if events_page_token:
            after = event_pages.decode_cursor(list_name, events_page_token, "events_page_token")
        else:
            users = await users_store.load_users(conn, app_id, [user_id])
            if user_id not in users:
                raise refs.user_not_found(key)
            user = users[user_id]
            merges = await users_store.merges_into(conn, app_id, user_id)

        async def fetch(cursor: event_pages.Cursor | None, size: int) -> list[events_store.Event]:
            return await events_store.list_oldest_first(
                conn, app_id, user_id, after=cursor, limit=size
            )

        page = await event_pages.fill_page(fetch, render, after=after, limit=EXPORT_PAGE_EVENTS)
    next_token = event_pages.encode_cursor(list_name, page.next_cursor) if page.next_cursor else ""
    return Export(user=user, events=page.items, merges=merges, next_events_page_token=next_token)


# -- aliases -------------------------------------------------------------------------------------


async def _changed_aliases(
    conn: DBConnection, app_id: str, profile: Profile, label: str, at: datetime
) -> User:
    await users_store.touch_user(conn, app_id, profile.user_id, at)
    fact = changes.change(
        changes.Kind.KIND_USER_UPDATED,
        app_id=app_id,
        user_id=profile.user_id,
        at=at,
        external_id=profile.external_id,
        changed_fields=[f"aliases.{label}"],
    )
    await changes.publish(conn, [fact])
    return (await users_store.load_users(conn, app_id, [profile.user_id]))[profile.user_id]


async def _locked(conn: DBConnection, app_id: str, key: RefKey) -> Profile:
    profile = await _lock_ref(conn, app_id, key)
    if profile is None:
        raise refs.user_not_found(key)
    return profile


async def _lock_ref(conn: DBConnection, app_id: str, key: RefKey) -> Profile | None:
    """The profile ``key`` names, locked; None if it names nobody.

    A Login can merge the profile a subscription or alias named into another between the
    lookup and the lock: the ref then names the merged user, so it is looked up again.
    """
    tried: set[uuid.UUID] = set()
    for _ in range(_LOOKUP_ATTEMPTS):
        user_id = (await refs.lookup(conn, app_id, [key])).get(key)
        if user_id is None or user_id in tried:
            return None
        profile = await users_store.lock_user(conn, app_id, user_id)
        if profile is not None:
            return profile
        tried.add(user_id)
    return None


#: Lookups of a ref whose user was merged away under it, before answering NOT_FOUND.
_LOOKUP_ATTEMPTS = 3


async def add_alias(
    conn: DBConnection, app_id: str, key: RefKey, alias: Alias, *, at: datetime
) -> User:
    """Give a user an alias. Adding an alias the user already has changes nothing.

    Raises:
        InvalidArgument: ``alias.label`` / ``alias.value`` malformed, reserved or placeholder.
        NotFound: ``USER_NOT_FOUND``.
        AlreadyExists: ``ALIAS_TAKEN`` (another user holds it) or ``ALIAS_LABEL_EXISTS`` (the
            user has another value for the label: remove it first).
        ResourceExhausted: ``ALIAS_LIMIT`` at :data:`MAX_ALIASES` aliases.
    """
    violations = FieldViolations()
    check_alias(alias.label, alias.value, "alias", violations)
    violations.raise_if_any()
    async with conn.transaction():
        profile = await _locked(conn, app_id, key)
        held = await users_store.alias_labels_of(conn, app_id, profile.user_id)
        if held.get(alias.label) == alias.value:
            return (await users_store.load_users(conn, app_id, [profile.user_id]))[profile.user_id]
        holder = (await users_store.users_by_alias(conn, app_id, [(alias.label, alias.value)])).get(
            (alias.label, alias.value)
        )
        if holder is not None:
            raise AlreadyExists(
                "another user has this alias",
                reason="ALIAS_TAKEN",
                field_violations=_violation("alias.value", "held by another user"),
            )
        if alias.label in held:
            raise AlreadyExists(
                f"the user already has a {alias.label!r} alias; remove it first",
                reason="ALIAS_LABEL_EXISTS",
                field_violations=_violation("alias.label", "the user has this label"),
            )
        if len(held) >= MAX_ALIASES:
            raise ResourceExhausted(
                f"a user may have at most {MAX_ALIASES} aliases",
                reason="ALIAS_LIMIT",
                metadata={"limit": str(MAX_ALIASES)},
                field_violations=_violation("alias", f"the user has {MAX_ALIASES} aliases"),
            )
        if not await users_store.insert_alias(conn, app_id, profile.user_id, alias, at):
            # Taken between our check and the insert (the insert waited for that commit).
            raise AlreadyExists(
                "another user has this alias",
                reason="ALIAS_TAKEN",
                field_violations=_violation("alias.value", "held by another user"),
            )
        return await _changed_aliases(conn, app_id, profile, alias.label, at)


async def remove_alias(
    conn: DBConnection, app_id: str, key: RefKey, label: str, *, at: datetime
) -> User:
    """Remove a user's alias by label.

    Raises:
        InvalidArgument: ``label`` malformed.
        NotFound: ``USER_NOT_FOUND``, or ``ALIAS_NOT_FOUND`` if the user has no such alias.
    """
    violations = FieldViolations()
    check_alias_label(label, "label", violations)
    violations.raise_if_any()
    async with conn.transaction():
        profile = await _locked(conn, app_id, key)
        if not await users_store.delete_alias(conn, app_id, profile.user_id, label):
            raise NotFound(
                f"the user has no {label!r} alias",
                reason="ALIAS_NOT_FOUND",
                metadata={"label": label},
            )
        return await _changed_aliases(conn, app_id, profile, label, at)


# -- customer fields -----------------------------------------------------------------------------


async def create_customer_field(
    conn: DBConnection, app_id: str, definition: CustomerField, *, at: datetime
) -> CustomerField:
    """Define a custom attribute.

    An auto-defined field of the same type is adopted: it becomes explicit with the given
    description and PII flag, so a field first seen in data can be documented later.

    Raises:
        InvalidArgument: ``field.name`` / ``field.description`` not acceptable.
        AlreadyExists: ``CUSTOMER_FIELD_EXISTS`` if the name is defined already (explicitly,
            or automatically with another type).
    """
    validate_new_field(definition)
    flipped = False
    async with conn.transaction():
        stored = await users_store.insert_customer_field(conn, app_id, definition, at)
        if stored is None and definition.pii:
            # Adopting an auto-defined (never PII) field as PII flips it: as UpdateCustomerField.
            await segments.lock_definitions(conn, app_id)
            await pii_fields.check_segments_allow_pii(conn, app_id, definition.name)
        if stored is None:
            stored = await users_store.adopt_auto_defined_field(conn, app_id, definition)
            flipped = stored is not None and definition.pii
    if flipped:
        await pii_fields.settle_field(
            conn, app_id, definition.name, to_pii=True, wait_for_readers=True
        )
    if stored is None:
        raise AlreadyExists(
            f"customer field {definition.name!r} is already defined",
            reason="CUSTOMER_FIELD_EXISTS",
            metadata={"name": definition.name},
            field_violations=_violation("field.name", "already defined"),
        )
    return stored


async def list_customer_fields(
    conn: DBConnection, app_id: str, *, size: int, token: str
) -> tuple[list[CustomerField], str]:
    """One page of an app's customer fields by name, and the next page's token."""
    limit = _page_size(size)
    after = decode_page_token("fields", token).get("n") if token else None
    fields = await users_store.list_customer_fields(conn, app_id, after=after, limit=limit + 1)
    next_token = (
        encode_page_token("fields", {"n": fields[limit - 1].name}) if len(fields) > limit else ""
    )
    return fields[:limit], next_token
