"""The value rules of identity (pure): ids, alias labels, email, phone, zone, language, country."""

from __future__ import annotations

import random

import email_validator
import phonenumbers
import pytest

from services.identity.validation import (
    MAX_ID_LENGTH,
    check_alias,
    check_external_id,
    is_placeholder_id,
    normalize_country,
    normalize_email,
    normalize_language,
    normalize_phone,
    normalize_timezone,
    text_problem,
)
from services.runtime.errors import FieldViolations


@pytest.mark.parametrize(
    "value",
    [
        "",
        " ",
        "\t\n",
        "null",
        "NULL",
        " Null ",
        "undefined",
        "Undefined",
        "0",
        "-1",
        "nil",
        "None",
        "NaN",
        "[object Object]",
        '"null"',
        "'undefined'",
        "anonymous",
        "00000000-0000-0000-0000-000000000000",
    ],
)
def test_placeholders_are_refused_as_ids(value: str) -> None:
    assert is_placeholder_id(value)
    violations = FieldViolations()
    check_external_id(value, "user.external_id", violations)
    assert [v.field for v in violations] == ["user.external_id"]


@pytest.mark.parametrize("value", ["42", "crm-0", "0042", "u_1", "nullable", "José", "a" * 200])
def test_real_ids_are_accepted(value: str) -> None:
    assert not is_placeholder_id(value)
    violations = FieldViolations()
    check_external_id(value, "f", violations)
    assert not violations


@pytest.mark.parametrize("value", [" id1", "id1 ", "a\x00b", "a\nb", "x" * (MAX_ID_LENGTH + 1)])
def test_ids_with_whitespace_control_characters_or_too_long_are_refused(value: str) -> None:
    violations = FieldViolations()
    check_external_id(value, "ref.external_id", violations)
    assert [v.field for v in violations] == ["ref.external_id"]


@pytest.mark.parametrize(
    ("label", "ok"),
    [
        ("crm_id", True),
        ("facebook_id", True),
        ("a" * 64, True),
        ("a" * 65, False),
        ("", False),
        ("CRM", False),
        ("1crm", False),
        ("crm-id", False),
        ("external_id", False),
        ("user_id", False),
    ],
)
def test_alias_labels(label: str, ok: bool) -> None:
    violations = FieldViolations()
    check_alias(label, "v1", "alias", violations)
    assert [v.field for v in violations] == ([] if ok else ["alias.label"])


def test_alias_values_follow_the_id_rules() -> None:
    violations = FieldViolations()
    check_alias("crm_id", "undefined", "alias", violations)
    assert [v.field for v in violations] == ["alias.value"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("ana@example.com", "ana@example.com"), ("Ana@Example.COM", "Ana@example.com")],
)
def test_email_is_normalised(value: str, expected: str) -> None:
    assert normalize_email(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "ana@example.com",
        "Ana.Maria+tag@Sub.Example.CO",
        "o'neil@x.io",
        "x_y-z@a-b.example",
        "a@x.c",
        "ü@bücher.de",
        "a@xn--bcher-kva.de",
    ],
)
def test_the_fast_path_agrees_with_the_full_validator(value: str) -> None:
    full = email_validator.validate_email(value, check_deliverability=False)
    assert normalize_email(value) == full.normalized


@pytest.mark.parametrize(
    "value",
    [
        "",
        "ana",
        "ana@",
        "@example.com",
        "ana@example",
        " ana@example.com",
        "a..b@x.com",
        "ana@x.test",
        "ana@ab--cd.com",
        "ana@-x.com",
        '"quoted"@example.com',
    ],
)
def test_bad_emails_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match=r"email|characters"):
        normalize_email(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("+34600111222", "+34600111222"),
        ("+34 600 111 222", "+34600111222"),
        ("+1 (650) 253-0000", "+16502530000"),
    ],
)
def test_phone_numbers_are_normalised_to_e164(value: str, expected: str) -> None:
    assert normalize_phone(value) == expected


@pytest.mark.parametrize(
    "value", ["600111222", "+999", "+12", "+1-800-FLOWERS", "+34 6001", "phone", ""]
)
def test_bad_phone_numbers_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="phone"):
        normalize_phone(value)


def _full_parser_answer(value: str) -> str | None:
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def test_plain_e164_numbers_get_the_full_parsers_answer() -> None:
    # E.164 input skips phonenumbers' parser; on every country code, valid or not, with or
    # without national-prefix quirks (Madagascar, San Marino...), the answer must not change.
    rng = random.Random(7)
    codes = sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)
    valid = 0
    for _ in range(20_000):
        digits = str(rng.choice(codes)) + "".join(rng.choices("0123456789", k=rng.randint(6, 12)))
        value = "+" + digits[:15]
        expected = _full_parser_answer(value)
        try:
            answer: str | None = normalize_phone(value)
        except ValueError:
            answer = None
        assert answer == expected, value
        valid += expected is not None
    assert valid > 500  # the sample holds valid numbers, not only refusals


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Europe/Madrid", "Europe/Madrid"),
        ("europe/madrid", "Europe/Madrid"),
        ("UTC", "UTC"),
        ("America/Argentina/Buenos_Aires", "America/Argentina/Buenos_Aires"),
    ],
)
def test_time_zones_are_iana_names(value: str, expected: str) -> None:
    assert normalize_timezone(value) == expected


@pytest.mark.parametrize(
    "value",
    ["", "Mars/Olympus", "localtime", "Factory", "posixrules", "Europe", "../etc/passwd", "+02:00"],
)
def test_what_zoneinfo_would_open_but_is_no_zone_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="IANA"):
        normalize_timezone(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("es", "es"),
        ("EN", "en"),
        ("pt-BR", "pt-BR"),
        ("pt_br", "pt-BR"),
        ("es-419", "es-419"),
        ("zh-hant-tw", "zh-Hant-TW"),
    ],
)
def test_languages(value: str, expected: str) -> None:
    assert normalize_language(value) == expected


@pytest.mark.parametrize("value", ["", "eng", "xx", "pt-XX", "english", "pt-BRA"])
def test_bad_languages_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="ISO"):
        normalize_language(value)


def test_countries() -> None:
    assert normalize_country("es") == "ES"
    for bad in ("", "ESP", "XX", "UK"):
        with pytest.raises(ValueError, match="ISO 3166"):
            normalize_country(bad)


def test_text_rules() -> None:
    assert text_problem("Ana", max_length=10) is None
    assert text_problem("x" * 11, max_length=10) is not None
    assert text_problem("a\x00", max_length=10) is not None
