"""Checking an import's rows with the rules every identity write follows.

:class:`RowChecker` is built from the options and the file's header; :meth:`RowChecker.check`
turns one record into a staged row (the normalised values, in the column order of
:class:`StagingLayout`) or a :class:`Rejection` naming the line, the column and the reason. The
normalisers are identity's own (:mod:`services.identity.validation`, the subscription token
rules), so a value the API refuses, an import refuses too. :meth:`RowChecker.check_all` checks
a chunk's records together, a column at a time (each column's reader over its cells, no
dispatch per cell); a chunk holding a row to refuse is checked row by row for its rejections.

What is checked here needs only the row itself; what needs the database (does the user exist,
is the attribute's type the one its customer field says, duplicate ids within the file) is
decided when the rows are applied (:mod:`services.identity.imports_store`).

Cells are trimmed of surrounding whitespace; a cell left empty means "no value" (ignored or
cleared, per ``empty_cells_clear``).
"""

from __future__ import annotations

import calendar
import functools
import math
import operator
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime

from services.identity.csv_cells import FORMULA_PREFIXES, looks_like_formula
from services.identity.import_csv import Record
from services.identity.import_options import AttributeKind, ColumnSpec, IdKind, ImportSpec
from services.identity.subscriptions import normalize_token
from services.identity.subscriptions_store import SubscriptionType
from services.identity.users import MAX_STRING_ATTRIBUTE_LENGTH
from services.identity.users_store import format_timestamp
from services.identity.validation import (
    MAX_ID_LENGTH,
    MAX_NAME_LENGTH,
    check_external_id,
    is_placeholder_id,
    normalize_country,
    normalize_email,
    normalize_language,
    normalize_phone,
    normalize_timezone,
    text_problem,
)
from services.runtime.errors import FieldViolation, FieldViolations, InvalidArgument

__all__ = ["Rejection", "RowChecker", "StagedRow", "StagingColumn", "StagingLayout"]

#: A row as staged: ``(line, key, ok, *values)`` in :attr:`StagingLayout.columns` order.
StagedRow = tuple[object, ...]


@dataclass(frozen=True, slots=True)
class Rejection:
    """A refused row: where, which column ("" for the whole row), why."""

    line: int
    column: str
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class StagingColumn:
    """A column of the staging table.

    Attributes:
        name: Its SQL name (generated, safe to interpolate).
        sql_type: Its SQL type.
        header: The file's column it comes from ("" for the bookkeeping columns).
        standard: The ``users`` column it fills, for standard fields.
        attribute: The custom attribute it fills.
        kind: The attribute's kind.
        subscription: The subscription type its cells are tokens of.
    """

    name: str
    sql_type: str
    header: str = ""
    standard: str | None = None
    attribute: str | None = None
    kind: AttributeKind | None = None
    subscription: SubscriptionType | None = None


class _Refused(ValueError):
    """A refused cell whose reason is not its column's."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


#: First characters of a formula (csv_cells.FORMULA_PREFIXES), for a set look-up per cell.
_FORMULA_FIRST = frozenset(FORMULA_PREFIXES)
_SQL_TYPES = {
    AttributeKind.STRING: "text",
    AttributeKind.NUMBER: "float8",
    AttributeKind.BOOL: "bool",
    AttributeKind.DATE: "text",
    AttributeKind.TIMESTAMP: "text",
    AttributeKind.DATE_AS_TIMESTAMP: "text",
}


@dataclass(frozen=True, slots=True)
class StagingLayout:
    """The staging table of an import: ``line``, ``key``, ``ok``, then one or more columns per
    mapped column (birthdates take three)."""

    columns: tuple[StagingColumn, ...]

    @classmethod
    def of(cls, spec: ImportSpec) -> StagingLayout:
        """The layout for ``spec`` (checked options)."""
        columns = [
            StagingColumn("line", "int8"),
            StagingColumn("key", "text"),
            StagingColumn("ok", "bool"),
        ]
        for index, column in enumerate(spec.columns):
            if column.standard == "birthdate":
                for part in ("birth_year", "birth_month", "birth_day"):
                    columns.append(StagingColumn(part, "int2", column.column, standard=part))
            elif column.standard is not None:
                columns.append(
                    StagingColumn(column.standard, "text", column.column, standard=column.standard)
                )
            elif column.attribute is not None:
                assert column.kind is not None
                columns.append(
                    StagingColumn(
                        f"a{index}",
                        _SQL_TYPES[column.kind],
                        column.column,
                        attribute=column.attribute,
                        kind=column.kind,
                    )
                )
            else:
                columns.append(
                    StagingColumn(
                        f"s{index}", "text", column.column, subscription=column.subscription
                    )
                )
        return cls(tuple(columns))

    @property
    def names(self) -> list[str]:
        """The column names, in order."""
        return [column.name for column in self.columns]

    @property
    def standard(self) -> list[StagingColumn]:
        """Columns filling ``users`` columns."""
        return [c for c in self.columns if c.standard is not None]

    @property
    def attributes(self) -> list[StagingColumn]:
        """Columns filling custom attributes."""
        return [c for c in self.columns if c.attribute is not None]

    @property
    def subscriptions(self) -> list[StagingColumn]:
        """Columns holding subscription tokens."""
        return [c for c in self.columns if c.subscription is not None]


# -- cell readers --------------------------------------------------------------------------------

_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_MONTH_DAY = re.compile(r"--([0-9]{2})-([0-9]{2})")
#: A date cell already in its stored form.
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


# A reader takes a trimmed, non-empty cell and returns its value, or raises ValueError saying
# what is wrong (the column's reason applies) or _Refused (a reason of its own).


def _cached(normalize: Callable[[str], str]) -> Callable[[str], str]:
    # Time zones, languages and countries repeat on almost every row: normalise each once (a
    # refused value raises again, uncached: refusals are rare).
    return functools.lru_cache(maxsize=4096)(normalize)


def _name(cell: str) -> str:
    problem = text_problem(cell, max_length=MAX_NAME_LENGTH)
    if problem is not None:
        raise ValueError(problem)
    return cell


def _string(cell: str) -> str:
    # Line breaks and tabs are fine inside a string attribute, as in UpsertUser.
    problem = text_problem(
        cell.replace("\n", " ").replace("\r", " ").replace("\t", " "),
        max_length=MAX_STRING_ATTRIBUTE_LENGTH,
    )
    if problem is not None:
        raise ValueError(problem)
    return cell


def _number(cell: str) -> float:
    if _NUMBER.fullmatch(cell):
        value = float(cell)
        if math.isfinite(value):
            return value
    raise ValueError(f"{cell!r} is not a number (use '.' as the decimal point)")


def _bool(cell: str) -> bool:
    value = _BOOLS.get(cell.lower())
    if value is None:
        raise ValueError(f"{cell!r} is not true/false, yes/no or 1/0")
    return value


def _parse_moment(cell: str, fmt: str, *, date_only: bool) -> datetime:
    try:
        if fmt:
            moment = datetime.strptime(cell, fmt)
        elif date_only:
            day = date.fromisoformat(cell)
            moment = datetime(day.year, day.month, day.day)
        else:
            moment = datetime.fromisoformat(cell)
    except ValueError:
        expected = fmt or ("YYYY-MM-DD" if date_only else "ISO 8601, e.g. 2026-01-31T09:30:00Z")
        raise ValueError(f"{cell!r} does not match {expected}") from None
    if date_only:
        moment = datetime(moment.year, moment.month, moment.day)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _stored_moment(moment: datetime) -> str:
    """``users_store.format_timestamp``, through ``isoformat`` (several times cheaper)."""
    utc = moment.astimezone(UTC)
    if utc.year < 1000:
        return format_timestamp(utc)
    text = utc.isoformat()  # 2026-01-31T09:30:00[.ffffff]+00:00
    return text[:-6] + ("Z" if utc.microsecond else ".000000Z")


#: ISO 8601 timestamps already in UTC as stored but for the fraction (``...T09:30:00Z``,
#: ``+00:00``, no fraction or six digits), whose stored form is their own text: what
#: ``_stored_moment`` makes of them, without the datetime round trip.
_UTC_ISO = re.compile(
    r"[1-9][0-9]{3}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{6})?(?:Z|\+00:00)"
)


def _moment_reader(fmt: str, *, date_only: bool) -> Callable[[str], str]:
    def read(cell: str) -> str:
        return _stored_moment(_parse_moment(cell, fmt, date_only=date_only))

    def read_iso(cell: str) -> str:
        plain = _UTC_ISO.fullmatch(cell)
        if plain is None:
            return read(cell)
        try:
            datetime.fromisoformat(cell)  # the calendar check (Feb 30, hour 25) it would make
        except ValueError:
            return read(cell)  # which says why
        return cell[:26] + "Z" if plain.group(1) else cell[:19] + ".000000Z"

    return read if fmt or date_only else read_iso


def _date_reader(fmt: str) -> Callable[[str], str]:
    """Cells of a date field: stored as the calendar date they name, 'YYYY-MM-DD' (a time of
    day or offset a format reads is dropped, not converted: the date is the one written)."""

    def read(cell: str) -> str:
        if not fmt and _ISO_DATE.fullmatch(cell):
            try:
                date.fromisoformat(cell)  # the calendar check (Feb 30)
                return cell
            except ValueError:
                pass  # said below
        return _parse_moment(cell, fmt, date_only=True).date().isoformat()

    return read


def _birthdate_reader(fmt: str, today: date) -> Callable[[str], tuple[int | None, int, int]]:
    def read(cell: str) -> tuple[int | None, int, int]:
        year: int | None
        partial = None if fmt else _MONTH_DAY.fullmatch(cell)
        if partial is not None:
            year, month, day = None, int(partial.group(1)), int(partial.group(2))
            # An unknown year allows February 29: leap years have it.
            if not 1 <= month <= 12 or not 1 <= day <= calendar.monthrange(2000, month)[1]:
                raise ValueError(f"{cell!r} is not a valid --MM-DD date")
            return year, month, day
        moment = _parse_moment(cell, fmt, date_only=True)
        if moment.date() > today:
            raise ValueError("a birthdate must not be in the future")
        return moment.year, moment.month, moment.day

    return read


def _token_reader(type_: SubscriptionType) -> Callable[[str], str]:
    phone = type_ in (SubscriptionType.SMS, SubscriptionType.WHATSAPP)

    def read(cell: str) -> str:
        if phone:
            # The same rule as normalize_token's, faster; a refused number takes the full
            # path below for its exact error.
            try:
                return normalize_phone(cell)
            except ValueError:
                pass
        violations = FieldViolations()
        token = normalize_token(type_, cell, "", violations)
        for violation in violations:
            raise _Refused(violation.reason or "INVALID_TOKEN", violation.description)
        assert token is not None
        return token

    return read


def _id_reader(kind: IdKind) -> Callable[[str], str]:
    def read_external(cell: str) -> str:
        # Cells are trimmed and not empty: what is left of check_external_id's rule is this
        # (the full check runs only to say what is wrong).
        if not is_placeholder_id(cell) and text_problem(cell, max_length=MAX_ID_LENGTH) is None:
            return cell
        violations = FieldViolations()
        check_external_id(cell, "", violations)
        for violation in violations:
            raise ValueError(violation.description)
        return cell

    def read_user_id(cell: str) -> str:
        try:
            return str(uuid.UUID(cell))
        except ValueError:
            raise ValueError(f"{cell!r} is not a user id (a UUID)") from None

    return read_user_id if kind is IdKind.USER_ID else read_external


# -- the checker ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Cell:
    index: int  # in the file's row
    header: str
    read: Callable[[str], object]
    width: int  # staging columns it fills (birthdate: 3)
    flag: bool  # stored as text: count formula-like values
    reason: str  # of a ValueError the reader raises


def _reader(column: ColumnSpec, today: date) -> tuple[Callable[[str], object], int, bool, str]:
    """The reader of a column's cells: (read, width, flag formulas, reason of refusals)."""
    if column.standard is not None:
        standard: dict[str, tuple[Callable[[str], object], bool, str]] = {
            "first_name": (_name, True, "INVALID_TEXT"),
            "last_name": (_name, True, "INVALID_TEXT"),
            "email": (normalize_email, True, "INVALID_EMAIL"),
            "phone": (normalize_phone, False, "INVALID_PHONE"),
            "timezone": (_cached(normalize_timezone), False, "INVALID_TIMEZONE"),
            "language": (_cached(normalize_language), False, "INVALID_LANGUAGE"),
            "country": (_cached(normalize_country), False, "INVALID_COUNTRY"),
        }
        if column.standard == "birthdate":
            return _birthdate_reader(column.date_format, today), 3, False, "INVALID_DATE"
        read, flag, reason = standard[column.standard]
        return read, 1, flag, reason
    if column.attribute is not None:
        kind = column.kind
        if kind is AttributeKind.STRING:
            return _string, 1, True, "INVALID_ATTRIBUTE_VALUE"
        if kind is AttributeKind.NUMBER:
            return _number, 1, False, "INVALID_NUMBER"
        if kind is AttributeKind.BOOL:
            return _bool, 1, False, "INVALID_BOOL"
        if kind is AttributeKind.DATE:
            return _date_reader(column.date_format), 1, False, "INVALID_DATE"
        date_only = kind is AttributeKind.DATE_AS_TIMESTAMP
        return _moment_reader(column.date_format, date_only=date_only), 1, False, "INVALID_DATE"
    assert column.subscription is not None
    email = column.subscription is SubscriptionType.EMAIL
    return _token_reader(column.subscription), 1, email, "INVALID_TOKEN"


def _header_index(header: Sequence[str]) -> dict[str, list[int]]:
    positions: dict[str, list[int]] = {}
    for index, name in enumerate(header):
        positions.setdefault(name.strip(), []).append(index)
    return positions


class RowChecker:
    """Checks the rows of one file.

    Args:
        spec: The checked options.
        header: The file's first record.
        today: The current date (birthdates must not be in the future).

    Raises:
        InvalidArgument: The identifier column or a mapped column is missing from the header,
            or appears in it more than once.
    """

    def __init__(self, spec: ImportSpec, header: Sequence[str], today: date) -> None:
        positions = _header_index(header)
        violations: list[FieldViolation] = []

        def locate(name: str, path: str) -> int:
            found = positions.get(name.strip(), [])
            if len(found) == 1:
                return found[0]
            problem = "is not in the file's header" if not found else "appears twice in the header"
            violations.append(FieldViolation(path, f"{name!r} {problem}", "COLUMN_NOT_IN_FILE"))
            return -1

        self.width = len(header)
        self.header = [name.strip() for name in header]
        self.identifier = spec.identifier_column.strip()
        self._id_index = locate(spec.identifier_column, "options.identifier_column")
        assert spec.id_kind is not None
        self._read_id = _id_reader(spec.id_kind)
        self._flag_id = spec.id_kind is not IdKind.USER_ID
        cells = []
        for position, column in enumerate(spec.columns):
            index = locate(column.column, f"options.columns[{position}].column")
            read, width, flag, reason = _reader(column, today)
            cells.append(_Cell(index, column.column.strip(), read, width, flag, reason))
        if violations:
            raise InvalidArgument(
                "the file's header does not have the columns the options name",
                reason="COLUMN_NOT_IN_FILE",
                field_violations=violations,
            )
        self._cells = tuple(cells)
        self._padding = (None,) * sum(cell.width for cell in cells)

    def check(self, record: Record) -> tuple[StagedRow | None, Rejection | None, bool]:
        """Check one data record.

        Returns:
            ``(staged, rejection, flagged)``: the staged row (for a rejected row whose id was
            read: ``(line, key, False, None...)``, so duplicates of it are still found), the
            rejection if the row is refused, and whether a text cell looks like a formula.
        """
        line = record.line
        if record.error:
            return None, Rejection(line, "", "INVALID_CSV", record.error), False
        cells = record.cells
        if len(cells) != self.width:
            reason = "TOO_MANY_COLUMNS" if len(cells) > self.width else "TOO_FEW_COLUMNS"
            message = f"{len(cells)} cells; the header has {self.width}"
            return None, Rejection(line, "", reason, message), False
        if record.bad_encoding:
            return None, self._encoding_rejection(record), False
        raw_id = cells[self._id_index].strip()
        try:
            key = self._read_id(raw_id)
        except ValueError as exc:
            return None, Rejection(line, self.identifier, "INVALID_ID", str(exc)), False
        flagged = self._flag_id and looks_like_formula(raw_id)
        values: list[object] = [line, key, True]
        for cell in self._cells:
            text = cells[cell.index].strip()
            if not text:
                if cell.width == 1:
                    values.append(None)
                else:
                    values += (None,) * cell.width
                continue
            if cell.flag and not flagged:
                flagged = text[0] in _FORMULA_FIRST
            try:
                value = cell.read(text)
            except ValueError as exc:
                reason = exc.reason if isinstance(exc, _Refused) else cell.reason
                rejection = Rejection(line, cell.header, reason, str(exc))
                return (line, key, False, *self._padding), rejection, flagged
            if cell.width == 1:
                values.append(value)
            else:
                values += value  # type: ignore[arg-type]  # a birthdate's (year, month, day)
        return tuple(values), None, flagged

    def check_all(self, records: Sequence[Record]) -> tuple[list[StagedRow], list[Rejection], int]:
        """Check data records: what :meth:`check` says of each, gathered.

        Returns:
            ``(staged, rejections, flagged)``: the staged rows and rejections in line order,
            and how many rows have a text cell that looks like a formula.
        """
        if records:
            try:
                return self._check_columns(records)
            except ValueError:
                pass  # a refused cell: the rows one by one, for its line, column and reason
        staged: list[StagedRow] = []
        refused: list[Rejection] = []
        flagged = 0
        for record in records:
            row, rejection, flag = self.check(record)
            if row is not None:
                staged.append(row)
            if rejection is not None:
                refused.append(rejection)
            flagged += flag
        return staged, refused, flagged

    def _check_columns(
        self, records: Sequence[Record]
    ) -> tuple[list[StagedRow], list[Rejection], int]:
        """:meth:`check_all` for records that all read cleanly, a column at a time: each
        column's reader is called over its cells with no per-cell dispatch.

        Raises:
            ValueError: A record or a cell would be refused (nothing is returned for any).
        """
        width = self.width
        for record in records:
            if record.error or record.bad_encoding or len(record.cells) != width:
                raise ValueError("a record that does not read cleanly")
        columns = list(zip(*(record.cells for record in records), strict=True))
        strip = str.strip
        ids = list(map(strip, columns[self._id_index]))
        values: list[Sequence[object]] = [
            [record.line for record in records],
            list(map(self._read_id, ids)),
            [True] * len(records),
        ]
        texts = [ids] if self._flag_id else []
        for cell in self._cells:
            cells = list(map(strip, columns[cell.index]))
            read = cell.read
            read_cells = [read(text) if text else None for text in cells]
            if cell.width == 1:
                values.append(read_cells)
            else:
                # A birthdate's (year, month, day): three staged columns.
                empty = (None,) * cell.width
                values += zip(*(empty if v is None else v for v in read_cells), strict=True)
            if cell.flag:
                texts.append(cells)
        return list(zip(*values, strict=True)), [], self._flagged(texts)

    @staticmethod
    def _flagged(columns: Sequence[Sequence[str]]) -> int:
        """How many rows have a cell, in any of ``columns``, that looks like a formula."""
        starts = operator.methodcaller("startswith", FORMULA_PREFIXES)
        if not any(any(map(starts, column)) for column in columns):
            return 0  # the usual case, without a loop through Python per cell
        return sum(any(map(starts, row)) for row in zip(*columns, strict=True))

    def _encoding_rejection(self, record: Record) -> Rejection:
        column = ""
        for index, cell in enumerate(record.cells):
            if any("\udc80" <= char <= "\udcff" for char in cell):
                column = self.header[index] if index < len(self.header) else ""
                break
        return Rejection(record.line, column, "INVALID_ENCODING", "bytes that are not valid UTF-8")
