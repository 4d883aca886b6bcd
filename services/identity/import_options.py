"""What an import is told to do (``ImportOptions``), checked before a byte of the file is read.

Pure: :func:`check_options` names every bad field at once (``options.columns[2].column``,
``options.alias_label``...), the way every identity request is validated.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum

from services.identity.fields import FieldType, attribute_name_problem
from services.identity.subscriptions import MAX_SUBSCRIPTIONS_PER_USER
from services.identity.subscriptions_store import SubscriptionType
from services.identity.validation import check_alias_label, text_problem
from services.runtime.errors import FieldViolations

__all__ = [
    "IMPORT_ID_PATTERN",
    "MAX_COLUMNS",
    "MAX_LIST_NAME_LENGTH",
    "STANDARD_TARGETS",
    "AttributeKind",
    "ColumnSpec",
    "Encoding",
    "IdKind",
    "ImportSpec",
    "Mode",
    "check_options",
    "date_attributes",
    "new_import_id",
    "with_defined_fields",
]

#: Client-chosen import ids: what the proto promises, safe in logs and URLs.
IMPORT_ID_PATTERN = re.compile(r"[a-z0-9-]{1,63}")
#: Most mapped columns in one import.
MAX_COLUMNS = 200
#: Longest ``list_name``.
MAX_LIST_NAME_LENGTH = 200
#: Standard fields a column may fill.
STANDARD_TARGETS = frozenset(
    {"first_name", "last_name", "email", "phone", "birthdate", "timezone", "language", "country"}
)
#: Subscription types a column may hold (web push needs keys a cell cannot carry).
_SUBSCRIPTION_TARGETS = frozenset(SubscriptionType) - {SubscriptionType.WEB_PUSH}


class IdKind(Enum):
    """How the identifier column names a user."""

    EXTERNAL_ID = "external_id"
    ALIAS = "alias"
    USER_ID = "user_id"


class Mode(Enum):
    """Which rows may create and which may update users."""

    CREATE_OR_UPDATE = "create_or_update"
    CREATE_ONLY = "create_only"
    UPDATE_ONLY = "update_only"


class Encoding(Enum):
    """The file's character encoding (Python codec names)."""

    UTF8 = "utf-8"
    LATIN1 = "latin-1"


class AttributeKind(Enum):
    """How the cells of a custom-attribute column are read."""

    STRING = "string"
    NUMBER = "number"
    BOOL = "bool"
    DATE = "date"
    TIMESTAMP = "timestamp"
    #: Not a request's: a DATE column feeding a field defined as a timestamp before date fields
    #: existed. Its cells are stored as they always were, timestamps at midnight UTC
    #: (:func:`with_defined_fields`).
    DATE_AS_TIMESTAMP = "date_as_timestamp"

    @property
    def field_type(self) -> FieldType:
        """The customer-field type of the values."""
        return (
            FieldType.TIMESTAMP
            if self is AttributeKind.DATE_AS_TIMESTAMP
            else FieldType(self.value)
        )

    @property
    def dated(self) -> bool:
        """Whether cells are dates or times (a ``date_format`` applies)."""
        return self in (
            AttributeKind.DATE,
            AttributeKind.TIMESTAMP,
            AttributeKind.DATE_AS_TIMESTAMP,
        )


@dataclass(frozen=True, slots=True)
class ColumnSpec:
    """One mapped column.

    Attributes:
        column: Header name.
        target: Which of ``standard``, ``attribute``, ``subscription`` the request set
            (``""``: none).
        standard: A standard field name.
        attribute: A custom attribute name (``kind`` says how to read it).
        kind: How the attribute's cells are read.
        subscription: The subscription type the cells are addresses or tokens of.
        date_format: ``strftime`` format of dates; empty for ISO 8601.
    """

    column: str
    target: str = ""
    standard: str | None = None
    attribute: str | None = None
    kind: AttributeKind | None = None
    subscription: SubscriptionType | None = None
    date_format: str = ""


@dataclass(frozen=True, slots=True)
class ImportSpec:
    """Checked import options (see ``ImportOptions`` in ``import.proto``).

    ``None`` in an enum field means the request left it unspecified or sent an unknown value;
    :func:`check_options` refuses what must be set.
    """

    import_id: str
    identifier_column: str
    id_kind: IdKind | None
    alias_label: str
    columns: tuple[ColumnSpec, ...]
    mode: Mode | None
    empty_cells_clear: bool
    delimiter: str
    quote: str
    encoding: Encoding | None
    list_name: str
    size_bytes: int = 0
    dry_run: bool = False


def new_import_id() -> str:
    """A fresh import id for a client that chose none."""
    return f"imp-{secrets.token_hex(8)}"


def _date_format_problem(fmt: str) -> str | None:
    if "%" not in fmt:
        return "a strftime format with at least one directive, such as %d/%m/%Y"
    try:
        # strftime passes unknown directives through; strptime, which reads the cells, does not.
        datetime.strptime(datetime(2001, 2, 3, 4, 5, 6).strftime(fmt), fmt)
    except ValueError as exc:
        return f"not a date format the import can read: {exc}"
    return None


def _check_column(index: int, column: ColumnSpec, seen: dict[str, str], v: FieldViolations) -> None:
    path = f"options.columns[{index}]"
    if not column.column.strip():
        v.add(f"{path}.column", "required: the header name of the column", reason="REQUIRED")
    if column.target not in ("standard", "attribute", "subscription"):
        v.add(f"{path}.target", "set standard_field, attribute or subscription", reason="REQUIRED")
        return
    dated = False
    if column.target == "standard":
        assert column.standard is not None
        if column.standard not in STANDARD_TARGETS:
            v.add(
                f"{path}.standard_field",
                f"unknown standard field {column.standard!r}; one of {sorted(STANDARD_TARGETS)}",
                reason="UNKNOWN_FIELD",
            )
        dated = column.standard == "birthdate"
        target = f"standard field {column.standard!r}"
    elif column.target == "attribute":
        problem = attribute_name_problem(column.attribute or "")
        if problem is not None:
            v.add(f"{path}.attribute.name", problem, reason="INVALID_ATTRIBUTE_NAME")
        if column.kind is None:
            v.add(f"{path}.attribute.type", "required", reason="REQUIRED")
        dated = column.kind is not None and column.kind.dated
        target = f"attribute {column.attribute!r}"
    else:
        if column.subscription is None or column.subscription not in _SUBSCRIPTION_TARGETS:
            v.add(
                f"{path}.subscription.type",
                "one of EMAIL, SMS, WHATSAPP, TELEGRAM, IOS_PUSH, ANDROID_PUSH (web push "
                "subscriptions need keys a cell cannot hold)",
                reason="INVALID_SUBSCRIPTION_TYPE",
            )
        target = ""  # several columns may hold subscriptions of one type (email, email2)
    if target:
        other = seen.get(target)
        if other is not None:
            v.add(f"{path}", f"{target} is filled by {other} already", reason="DUPLICATE_TARGET")
        seen[target] = path
    if column.date_format:
        if not dated:
            v.add(
                f"{path}.date_format",
                "only for birthdate and DATE or TIMESTAMP attributes",
                reason="NOT_APPLICABLE",
            )
        else:
            problem = _date_format_problem(column.date_format)
            if problem is not None:
                v.add(f"{path}.date_format", problem, reason="INVALID_DATE_FORMAT")


def check_options(spec: ImportSpec) -> ImportSpec:
    """Check import options; returns them with defaults filled in.

    Raises:
        InvalidArgument: Naming every bad field (``options.identifier_column``,
            ``options.columns[2].attribute.type``, ...).
    """
    v = FieldViolations()
    if spec.import_id and not IMPORT_ID_PATTERN.fullmatch(spec.import_id):
        v.add(
            "options.import_id",
            "1-63 characters of lowercase letters, digits and '-'",
            reason="INVALID_IMPORT_ID",
        )
    if not spec.identifier_column.strip():
        v.add(
            "options.identifier_column", "required: the header of the id column", reason="REQUIRED"
        )
    if spec.id_kind is None:
        v.add(
            "options.identifier_kind", "required: EXTERNAL_ID, ALIAS or USER_ID", reason="REQUIRED"
        )
    if spec.id_kind is IdKind.ALIAS:
        check_alias_label(spec.alias_label, "options.alias_label", v)
    elif spec.alias_label:
        v.add("options.alias_label", "only for IDENTIFIER_KIND_ALIAS", reason="NOT_APPLICABLE")
    if spec.mode is None:
        v.add("options.mode", "unknown mode", reason="INVALID_MODE")
    elif spec.mode is Mode.CREATE_ONLY and spec.id_kind is IdKind.USER_ID:
        v.add(
            "options.mode",
            "rows naming users by user_id never create users: use UPDATE_ONLY or CREATE_OR_UPDATE",
            reason="INVALID_MODE",
        )
    if spec.encoding is None:
        v.add("options.encoding", "unknown encoding", reason="INVALID_ENCODING")
    for name, value in (("delimiter", spec.delimiter), ("quote", spec.quote)):
        if len(value) != 1 or value in "\r\n":
            v.add(f"options.{name}", "one character, not a line break", reason="INVALID_CHARACTER")
    if spec.delimiter == spec.quote:
        v.add("options.quote", "must differ from the delimiter", reason="INVALID_CHARACTER")
    if not spec.columns:
        v.add("options.columns", "map at least one column", reason="REQUIRED")
    if len(spec.columns) > MAX_COLUMNS:
        v.add("options.columns", f"at most {MAX_COLUMNS} columns", reason="TOO_MANY_COLUMNS")
    subscriptions = sum(column.target == "subscription" for column in spec.columns)
    if subscriptions > MAX_SUBSCRIPTIONS_PER_USER:
        v.add(
            "options.columns",
            f"at most {MAX_SUBSCRIPTIONS_PER_USER} subscription columns (a user's cap)",
            reason="TOO_MANY_COLUMNS",
        )
    seen: dict[str, str] = {}
    headers: dict[tuple[str, bool], int] = {}
    for index, column in enumerate(spec.columns):
        _check_column(index, column, seen, v)
        # A header may feed one profile value and one subscription (an email column is both
        # the profile's email and an EMAIL subscription), not two of either.
        first = headers.setdefault((column.column, column.target == "subscription"), index)
        if first != index:
            v.add(
                f"options.columns[{index}].column",
                f"{column.column!r} is mapped by options.columns[{first}] already",
                reason="DUPLICATE_COLUMN",
            )
    if spec.size_bytes < 0:
        v.add("options.size_bytes", "must not be negative (0: unknown)", reason="OUT_OF_RANGE")
    if spec.list_name:
        problem = text_problem(spec.list_name, max_length=MAX_LIST_NAME_LENGTH)
        if problem is None and not spec.list_name.strip():
            problem = "must not be blank"
        if problem is not None:
            v.add("options.list_name", problem, reason="INVALID_TEXT")
    v.raise_if_any(reason="INVALID_IMPORT_OPTIONS")
    return spec


def date_attributes(spec: ImportSpec) -> set[str]:
    """The attributes DATE columns fill: whose definitions :func:`with_defined_fields` needs."""
    return {c.attribute for c in spec.columns if c.kind is AttributeKind.DATE and c.attribute}


def with_defined_fields(spec: ImportSpec, field_types: Mapping[str, FieldType]) -> ImportSpec:
    """``spec`` with its DATE columns that feed a field defined as a timestamp read as
    DATE_AS_TIMESTAMP, so apps that imported dates before date fields existed go on as before.

    Args:
        spec: Checked options.
        field_types: The types of the app's fields the DATE columns name (others are new or
            dates: their cells stay calendar dates).
    """
    columns = tuple(
        replace(column, kind=AttributeKind.DATE_AS_TIMESTAMP)
        if column.kind is AttributeKind.DATE
        and field_types.get(column.attribute or "") is FieldType.TIMESTAMP
        else column
        for column in spec.columns
    )
    return spec if columns == spec.columns else replace(spec, columns=columns)
