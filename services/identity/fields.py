"""Customer fields: an app's definitions of its users' custom attributes.

A definition fixes an attribute's type (string, number, bool, timestamp, date) so every stored
value of that name has the same JSON shape and segments can compare and cast it. Writes are checked
against the definitions; a name with no definition is defined by its first value or refused,
as the app's ``undefined_fields`` setting says (:class:`FieldCatalog`).

Pure: the SQL is in :mod:`services.identity.users_store`, the calls that store definitions in
:mod:`services.identity.users`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import date, datetime
from enum import StrEnum

from services.identity.validation import text_problem
from services.runtime.errors import FieldViolations

__all__ = [
    "ATTRIBUTE_NAME_PATTERN",
    "MAX_DESCRIPTION_LENGTH",
    "MAX_FIELD_NAME_LENGTH",
    "RESERVED_FIELD_NAMES",
    "CustomerField",
    "FieldCatalog",
    "FieldType",
    "attribute_name_problem",
    "parse_date",
    "validate_new_field",
]

#: Longest custom attribute (customer field) name.
MAX_FIELD_NAME_LENGTH = 64
#: Longest description of a customer field.
MAX_DESCRIPTION_LENGTH = 1_000
#: Lowercase ASCII letters, digits and ``_``, starting with a letter: safe as a template
#: variable (``{{ plan }}``), a JSON key and a segment path without quoting.
ATTRIBUTE_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")
#: Names a custom attribute cannot take: the standard attributes and the profile's own fields,
#: which templates and segments address by the same bare name.
RESERVED_FIELD_NAMES = frozenset(
    {
        "user_id",
        "external_id",
        "aliases",
        "first_name",
        "last_name",
        "email",
        "phone",
        "birthdate",
        "timezone",
        "language",
        "country",
        "attributes",
        "subscriptions",
        "counts",
        "create_time",
        "update_time",
    }
)


class FieldType(StrEnum):
    """The type every value of a custom attribute has (the ``customer_fields.type`` column)."""

    STRING = "string"
    NUMBER = "number"
    BOOL = "bool"
    TIMESTAMP = "timestamp"
    #: A calendar date, no time of day or zone: stored and conveyed as ``'YYYY-MM-DD'``.
    DATE = "date"


#: The one form of a date value: four-digit year, two-digit month and day.
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def parse_date(text: str) -> date:
    """The calendar date of a ``'YYYY-MM-DD'`` value (the stored and API form of a date field).

    Stricter than ``date.fromisoformat``, which also takes ``20260131`` and week dates: one
    spelling per date keeps equality a plain comparison of the stored strings.

    Raises:
        ValueError: Not a valid date in that form.
    """
    if _ISO_DATE.fullmatch(text):
        try:
            return date.fromisoformat(text)
        except ValueError:
            pass  # 2026-02-30, month 13: said below
    raise ValueError(f"{text[:32]!r} is not a date 'YYYY-MM-DD'")


@dataclass(frozen=True, slots=True)
class CustomerField:
    """The definition of one custom attribute.

    Attributes:
        name: The attribute name.
        type: The type of its values.
        description: What it means, for people building segments and templates.
        pii: Whether its values are personal data.
        auto_defined: Whether it was defined by its first write rather than explicitly.
        create_time: When it was defined (None before it is stored).
    """

    name: str
    type: FieldType
    description: str = ""
    pii: bool = False
    auto_defined: bool = False
    create_time: datetime | None = None


@functools.lru_cache(maxsize=4096)
def attribute_name_problem(name: str) -> str | None:
    """What is wrong with a custom attribute name, or None if it is acceptable."""
    if not name:
        return "attribute names must not be empty"
    if len(name) > MAX_FIELD_NAME_LENGTH:
        return f"attribute names must be at most {MAX_FIELD_NAME_LENGTH} characters"
    if not ATTRIBUTE_NAME_PATTERN.fullmatch(name):
        return "attribute names are lowercase letters, digits and '_', starting with a letter"
    if name in RESERVED_FIELD_NAMES:
        return f"{name!r} is a standard field, not a custom attribute"
    return None


def validate_new_field(field: CustomerField, *, path: str = "field") -> None:
    """Check a definition a caller wants to create.

    Args:
        field: The definition.
        path: Its path in the request, for the violations.

    Raises:
        InvalidArgument: Naming ``field.name``, ``field.type`` or ``field.description``.
    """
    violations = FieldViolations()
    problem = attribute_name_problem(field.name)
    if problem is not None:
        violations.add(f"{path}.name", problem, reason="INVALID_FIELD_NAME")
    problem = text_problem(field.description, max_length=MAX_DESCRIPTION_LENGTH)
    if problem is not None:
        violations.add(f"{path}.description", problem, reason="INVALID_TEXT")
    violations.raise_if_any()


class FieldCatalog:
    """The definitions a write is checked against, and those it defines on the way.

    Built from the stored definitions of the names a batch uses. With ``auto_define``, the first
    successful use of an undefined name defines it with the type of that value; later items of
    the batch are then checked against that type. :meth:`new_definitions` lists what to store.

    Args:
        defined: Stored definitions, by name.
        auto_define: Whether undefined names are defined by their first value (else refused).
    """

    def __init__(self, defined: Mapping[str, CustomerField], *, auto_define: bool) -> None:
        self._defined = dict(defined)
        self._new: dict[str, CustomerField] = {}
        self.auto_define = auto_define

    def get(self, name: str) -> CustomerField | None:
        """The definition of ``name``, stored or defined earlier in this batch."""
        return self._defined.get(name) or self._new.get(name)

    def type_of(self, name: str) -> FieldType | None:
        """The type of ``name``, if it is defined."""
        field = self.get(name)
        return field.type if field is not None else None

    def define(self, definitions: Iterable[CustomerField]) -> None:
        """Record auto-definitions made by one successful write (first definition wins)."""
        for field in definitions:
            if self.get(field.name) is None:
                self._new[field.name] = replace(field, auto_defined=True)

    def new_definitions(self) -> list[CustomerField]:
        """The auto-definitions to store, in the order they were made."""
        return list(self._new.values())

    def timestamp_names(self) -> frozenset[str]:
        """Names of every known field of type timestamp."""
        return frozenset(
            name
            for name, field in (*self._defined.items(), *self._new.items())
            if field.type is FieldType.TIMESTAMP
        )
