"""The pure parts of imports: reading CSV in chunks, phone numbers, formula cells, options."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from services.identity.csv_cells import csv_text, looks_like_formula, neutralise
from services.identity.fields import FieldType
from services.identity.import_csv import CsvStream, Record, UnreadableFile
from services.identity.import_options import (
    AttributeKind,
    ColumnSpec,
    Encoding,
    IdKind,
    ImportSpec,
    Mode,
    check_options,
    date_attributes,
    with_defined_fields,
)
from services.identity.import_rows import RowChecker, _moment_reader, _parse_moment, _stored_moment
from services.identity.subscriptions_store import SubscriptionType
from services.identity.users_store import format_timestamp
from services.runtime.errors import InvalidArgument


def _read(data: bytes, chunk: int, **dialect: str) -> list[Record]:
    stream = CsvStream(
        encoding=dialect.get("encoding", "utf-8"),
        delimiter=dialect.get("delimiter", ","),
        quote=dialect.get("quote", '"'),
    )
    records: list[Record] = []
    for start in range(0, len(data), chunk):
        records += stream.feed(data[start : start + chunk])
    return records + list(stream.finish())


FILE = ('\ufeffid,name\r\n1,"multi\nline, with ""quotes"""\r\n\r\n2,Zoë\r3,last').encode()


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64, 4096])
def test_records_and_line_numbers_do_not_depend_on_chunk_boundaries(chunk: int) -> None:
    records = _read(FILE, chunk)
    assert [(r.line, r.cells) for r in records] == [
        (1, ["id", "name"]),
        (2, ["1", 'multi\nline, with "quotes"']),
        (5, ["2", "Zoë"]),
        (6, ["3", "last"]),
    ]


def test_a_block_read_in_one_go_keeps_its_line_numbers_and_blank_lines_out() -> None:
    records = _read(b"id,n\n1,a\n\n2,b\r\n3,\xff\n", 4096)
    assert [(r.line, r.cells, r.bad_encoding) for r in records] == [
        (1, ["id", "n"], False),
        (2, ["1", "a"], False),
        (4, ["2", "b"], False),
        (5, ["3", "\udcff"], True),
    ]


def test_bad_bytes_mark_their_record_and_bad_quotes_are_an_error_record() -> None:
    records = _read(b'id,n\n1,ok\n2,\xff\n3,"x"y\n4,"open\n', 3)
    assert [(r.line, r.bad_encoding, bool(r.error)) for r in records] == [
        (1, False, False),
        (2, False, False),
        (3, True, False),
        (4, False, True),
        (5, False, True),
    ]
    assert "not closed" in records[-1].error


def test_latin1_reads_every_byte_as_windows_1252_where_it_defines_it() -> None:
    data = b"id,n\n1,M\xfcller\x85 O\x92Brien \x80\x81\x8d\x8f\x90\x9d\n"
    [_header, row] = _read(data, 2, encoding="latin-1")
    assert row.cells == ["1", "M\u00fcller\u2026 O\u2019Brien \u20ac\x81\x8d\x8f\x90\x9d"]
    assert not row.bad_encoding


def test_rows_of_delimiters_only_are_skipped_like_blank_lines() -> None:
    # The quoted line break makes the block go record by record: both readers skip them.
    data = b'id,a,b\n1,x,\n,,\n , ,\n\n2,"y\nz",\n,,\n"",""," "\n'
    for chunk in (1, 3, 4096):
        records = _read(data, chunk)
        assert [(r.line, r.cells) for r in records] == [
            (1, ["id", "a", "b"]),
            (2, ["1", "x", ""]),
            (6, ["2", "y\nz", ""]),
        ]
    assert [r.line for r in _read(b"id,a\n,,\n1,x\n", 4096)] == [1, 3]


def test_an_unclosed_quote_cannot_swallow_more_than_a_record_limit() -> None:
    stream = CsvStream(encoding="utf-8", delimiter=",", quote='"')
    list(stream.feed(b'id,n\n1,"'))
    for _ in range(10):
        list(stream.feed(b"x" * 100_000 + b"\n"))
    with pytest.raises(UnreadableFile, match="line 2"):
        list(stream.feed(b"x" * 100_000 + b"\n"))


def test_formula_cells_are_recognised_and_defused() -> None:
    assert [looks_like_formula(c) for c in ("=1", "+1", "-1", "@x", "a=1", "", " =1")] == [
        True,
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    assert neutralise("=cmd|' /C calc'!A0") == "'=cmd|' /C calc'!A0"
    assert neutralise("\t=1") == "'\t=1"
    assert neutralise(42) == "42"
    assert neutralise(None) == ""
    assert csv_text([["=1", 'a "b"', "-2"]]) == '\'=1,"a ""b""",\'-2\r\n'


def test_timestamps_are_stored_as_every_identity_write_stores_them() -> None:
    moments = [
        datetime(2026, 1, 31, 9, 30, tzinfo=UTC),
        datetime(2026, 1, 31, 9, 30, 0, 120, tzinfo=UTC),
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-5))),
        datetime(987, 6, 5, tzinfo=UTC),
    ]
    assert [_stored_moment(m) for m in moments] == [format_timestamp(m) for m in moments]


def test_utc_timestamps_read_as_the_full_reader_reads_them() -> None:
    read = _moment_reader("", date_only=False)
    cells = [
        "2026-01-31T09:30:00Z",
        "2026-01-31T09:30:00+00:00",
        "2026-01-31T09:30:00.000120Z",
        "2026-01-31T09:30:00.000000+00:00",
        "2026-01-31T09:30:00+01:00",
        "2026-01-31T09:30:00.12Z",
        "0987-06-05T00:00:00Z",
        "2026-02-30T09:30:00Z",
        "2026-01-31T24:00:00Z",
        "2026-01-31T09:30:60Z",
    ]

    def outcome(reader: object, cell: str) -> str:
        try:
            return str(reader(cell))  # type: ignore[operator]
        except ValueError as exc:
            return f"refused: {exc}"

    def full(cell: str) -> str:
        return _stored_moment(_parse_moment(cell, "", date_only=False))

    assert [outcome(read, c) for c in cells] == [outcome(full, c) for c in cells]
    assert read(cells[0]) == "2026-01-31T09:30:00.000000Z"


def test_a_batch_of_rows_is_checked_as_each_row_alone_is() -> None:
    spec = _spec(
        columns=(
            ColumnSpec("email", target="standard", standard="email"),
            ColumnSpec("born", target="standard", standard="birthdate"),
            ColumnSpec("n", target="attribute", attribute="n", kind=AttributeKind.NUMBER),
            ColumnSpec("name", target="standard", standard="first_name"),
        )
    )
    checker = RowChecker(spec, ["id", "email", "born", "n", "name"], date(2026, 1, 1))
    clean = [
        Record(2, ["a", " A@Example.com ", "1990-02-03", "1.5", "=x"]),
        Record(3, ["b", "", "--02-29", "", "Bo"]),
        Record(5, ["-c", "c@example.com", "", "-2", ""]),
    ]
    messy = [*clean, Record(6, ["d", "nope", "", "", ""]), Record(7, ["e", "e@x.io"])]
    for records in (clean, messy):
        one_by_one = [checker.check(r) for r in records]
        staged, refused, flagged = checker.check_all(records)
        assert staged == [row for row, _, _ in one_by_one if row is not None]
        assert refused == [rejection for _, rejection, _ in one_by_one if rejection is not None]
        assert flagged == sum(flag for _, _, flag in one_by_one)
    assert checker.check_all(clean)[2] == 2
    assert [r.reason for r in checker.check_all(messy)[1]] == ["INVALID_EMAIL", "TOO_FEW_COLUMNS"]


def _spec(**changes: object) -> ImportSpec:
    values: dict[str, object] = {
        "import_id": "",
        "identifier_column": "id",
        "id_kind": IdKind.EXTERNAL_ID,
        "alias_label": "",
        "columns": (ColumnSpec("email", target="standard", standard="email"),),
        "mode": Mode.CREATE_OR_UPDATE,
        "empty_cells_clear": False,
        "delimiter": ",",
        "quote": '"',
        "encoding": Encoding.UTF8,
        "list_name": "",
    }
    values.update(changes)
    return ImportSpec(**values)  # type: ignore[arg-type]


def _fields(spec: ImportSpec) -> list[str]:
    with pytest.raises(InvalidArgument) as caught:
        check_options(spec)
    return [v.field for v in caught.value.field_violations]


def test_options_are_checked_field_by_field() -> None:
    assert check_options(_spec()).identifier_column == "id"
    assert _fields(_spec(id_kind=IdKind.USER_ID, mode=Mode.CREATE_ONLY)) == ["options.mode"]
    assert _fields(_spec(quote=",")) == ["options.quote"]
    assert _fields(_spec(id_kind=None, encoding=None, size_bytes=-1)) == [
        "options.identifier_kind",
        "options.encoding",
        "options.size_bytes",
    ]
    timestamp = ColumnSpec(
        "t", target="attribute", attribute="t", kind=AttributeKind.TIMESTAMP, date_format="%Q"
    )
    assert _fields(_spec(columns=(timestamp,))) == ["options.columns[0].date_format"]
    twice = ColumnSpec("a", target="attribute", attribute="plan", kind=AttributeKind.STRING)
    again = ColumnSpec("b", target="attribute", attribute="plan", kind=AttributeKind.NUMBER)
    assert _fields(_spec(columns=(twice, again))) == ["options.columns[1]"]


def test_one_header_may_feed_a_profile_value_and_a_subscription_not_two_of_either() -> None:
    field = ColumnSpec("email", target="standard", standard="email")
    sub = ColumnSpec("email", target="subscription", subscription=SubscriptionType.EMAIL)
    assert len(check_options(_spec(columns=(field, sub))).columns) == 2
    other = ColumnSpec("email", target="attribute", attribute="mail", kind=AttributeKind.STRING)
    assert _fields(_spec(columns=(field, sub, other))) == ["options.columns[2].column"]
    assert _fields(_spec(columns=(sub, field, sub))) == ["options.columns[2].column"]


def _date_column(kind: AttributeKind, fmt: str = "") -> ColumnSpec:
    return ColumnSpec("d", target="attribute", attribute="d", kind=kind, date_format=fmt)


@pytest.mark.parametrize(
    ("fmt", "cell", "stored"),
    [
        ("", "2020-05-10", "2020-05-10"),
        ("", "20200510", "2020-05-10"),
        ("%d/%m/%Y", "10/05/2020", "2020-05-10"),
        # A time of day a format reads is dropped, never converted to another day.
        ("%d/%m/%Y %H:%M%z", "10/05/2020 23:30-0500", "2020-05-10"),
    ],
)
def test_a_date_column_stores_the_calendar_date_it_names(fmt: str, cell: str, stored: str) -> None:
    spec = _spec(columns=(_date_column(AttributeKind.DATE, fmt),))
    staged, rejection, _ = RowChecker(spec, ["id", "d"], date(2026, 1, 1)).check(
        Record(2, ["a", cell])
    )
    assert rejection is None
    assert staged is not None
    assert staged[-1] == stored


def test_a_bad_date_cell_is_refused() -> None:
    spec = _spec(columns=(_date_column(AttributeKind.DATE),))
    _, rejection, _ = RowChecker(spec, ["id", "d"], date(2026, 1, 1)).check(
        Record(2, ["a", "2023-02-29"])
    )
    assert rejection is not None
    assert (rejection.column, rejection.reason) == ("d", "INVALID_DATE")


def test_a_date_column_feeding_a_timestamp_field_stores_midnight_utc_as_before() -> None:
    spec = _spec(
        columns=(
            _date_column(AttributeKind.DATE),
            ColumnSpec("e", target="attribute", attribute="e", kind=AttributeKind.DATE),
        )
    )
    assert date_attributes(spec) == {"d", "e"}
    resolved = with_defined_fields(spec, {"d": FieldType.TIMESTAMP, "e": FieldType.DATE})
    assert [c.kind for c in resolved.columns] == [
        AttributeKind.DATE_AS_TIMESTAMP,
        AttributeKind.DATE,
    ]
    assert [c.kind.field_type for c in resolved.columns if c.kind] == [
        FieldType.TIMESTAMP,
        FieldType.DATE,
    ]
    assert with_defined_fields(spec, {}) is spec
    staged, _, _ = RowChecker(resolved, ["id", "d", "e"], date(2026, 1, 1)).check(
        Record(2, ["a", "2020-05-10", "2020-05-10"])
    )
    assert staged is not None
    assert staged[-2:] == ("2020-05-10T00:00:00.000000Z", "2020-05-10")
