"""Rules for the values identity accepts: ids, aliases, names and the standard attributes.

Every service-facing module validates through these functions so one rule has one definition.
Two shapes are offered:

* ``normalize_*`` take a value and return its canonical form, or raise :class:`ValueError`
  whose message says what is wrong (for domain code that composes its own errors);
* ``check_*`` record a violation on a :class:`~services.runtime.errors.FieldViolations`
  under the given field path (``user.email``, ``requests[3].ref.external_id``), so one request
  can report all of its bad fields at once.

Nothing here does I/O: email addresses are checked for syntax only (no DNS), phone numbers
against libphonenumber's metadata, time zones against the IANA database zoneinfo sees.
"""

from __future__ import annotations

import functools
import re
import zoneinfo
from collections.abc import Callable, Sequence

import email_validator
import phonenumbers

from services.identity import phones
from services.runtime.errors import FieldViolations

__all__ = [
    "ALIAS_LABEL_PATTERN",
    "ISO_639_1",
    "ISO_3166_ALPHA2",
    "MAX_ALIAS_LABEL_LENGTH",
    "MAX_EMAIL_LENGTH",
    "MAX_ID_LENGTH",
    "MAX_NAME_LENGTH",
    "PLACEHOLDER_IDS",
    "RESERVED_ALIAS_LABELS",
    "check_alias",
    "check_alias_label",
    "check_country",
    "check_email",
    "check_external_id",
    "check_language",
    "check_mask_paths",
    "check_phone",
    "check_text",
    "check_timezone",
    "external_id_problem",
    "is_placeholder_id",
    "normalize_country",
    "normalize_email",
    "normalize_language",
    "normalize_phone",
    "normalize_timezone",
    "text_problem",
]

#: Longest external id or alias value, in characters.
MAX_ID_LENGTH = 200
#: Longest alias label, in characters.
MAX_ALIAS_LABEL_LENGTH = 64
#: Longest first or last name, in characters.
MAX_NAME_LENGTH = 200
#: Longest email address (RFC 5321's path limit less the angle brackets).
MAX_EMAIL_LENGTH = 254

#: Values that SDKs and CRMs send when they have no id at all ("null" from a serialised None,
#: "undefined" and "[object Object]" from JavaScript, "0"/"-1" from an unset integer...).
#: Compared case-insensitively after trimming whitespace and one pair of quotes. Accepting one
#: would fold every anonymous visitor of an app into a single profile.
PLACEHOLDER_IDS = frozenset(
    {
        "",
        "null",
        "(null)",
        "<null>",
        "nil",
        "<nil>",
        "none",
        "undefined",
        "nan",
        "0",
        "-1",
        "[object object]",
        "[]",
        "{}",
        "true",
        "false",
        "anonymous",
        "anon",
        "guest",
        "unknown",
        "n/a",
        "#n/a",
        "not_authenticated",
        "id",
        "user_id",
        "external_id",
        "distinct_id",
        "00000000-0000-0000-0000-000000000000",
    }
)

#: Alias labels that would make a ref ambiguous with another kind of ref.
RESERVED_ALIAS_LABELS = frozenset({"external_id", "user_id", "subscription_id"})
#: Lowercase ASCII letters, digits and ``_``, starting with a letter.
ALIAS_LABEL_PATTERN = re.compile(r"[a-z][a-z0-9_]*")

_QUOTES = "\"'`"
_PHONE_CHARS = re.compile(r"\+[0-9 ().\-]+")
_LANGUAGE = re.compile(
    r"(?P<lang>[A-Za-z]{2})(?:[-_](?P<script>[A-Za-z]{4}))?(?:[-_](?P<region>[A-Za-z]{2}|[0-9]{3}))?"
)
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PLAIN_EMAIL = re.compile(
    rf"(?P<local>{_ATOM}(?:\.{_ATOM})*)@(?P<domain>(?:{_LABEL}\.)+[A-Za-z]{{2,63}})"
)
_MAX_LOCAL_PART = 64
# Domains RFC 6761 reserves (".test", ".localhost"...): the full validator refuses them.
_SPECIAL_USE_TLDS = frozenset(
    name.rpartition(".")[2] for name in email_validator.SPECIAL_USE_DOMAIN_NAMES
)
# Unicode's Cc category is exactly these two ranges; a regex finds them fast.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# Files zoneinfo can open that are not zones a user lives in: "localtime" is the host's own
# setting, "Factory" is tzdata's "local time is unknown" placeholder, "posixrules" a template.
_NOT_ZONES = frozenset({"localtime", "Factory", "posixrules"})


def _bare(value: str) -> str:
    """``value`` trimmed of whitespace and of one pair of matching quotes, casefolded."""
    bare = value.strip()
    if len(bare) >= 2 and bare[0] == bare[-1] and bare[0] in _QUOTES:
        bare = bare[1:-1].strip()
    return bare.casefold()


def is_placeholder_id(value: str) -> bool:
    """Whether ``value`` is a stand-in for "no id" rather than an id.

    Case-insensitive; surrounding whitespace and one pair of quotes are ignored, so ``" NULL "``
    and ``'"undefined"'`` count. Whitespace-only strings count too.

    Args:
        value: A candidate external id or alias value.

    Returns:
        True if the value must be refused as an id.
    """
    return _bare(value) in PLACEHOLDER_IDS


def text_problem(value: str, *, max_length: int) -> str | None:
    """What is wrong with free text, or None: too long, or containing control characters.

    Control characters (NUL above all, which PostgreSQL cannot store in text) are refused
    rather than stripped, so what is stored is what the caller sent.

    Args:
        value: The text.
        max_length: Longest allowed length, in characters.

    Returns:
        A description of the problem, or None if the text is acceptable.
    """
    if len(value) > max_length:
        return f"must be at most {max_length} characters, got {len(value)}"
    if _CONTROL.search(value) is not None:
        return "must not contain control characters"
    return None


def check_text(value: str, field: str, violations: FieldViolations, *, max_length: int) -> None:
    """Record a violation for ``field`` if ``value`` is not acceptable free text.

    Args:
        value: The text.
        field: Its path in the request.
        violations: Where to record the problem.
        max_length: Longest allowed length, in characters.
    """
    problem = text_problem(value, max_length=max_length)
    if problem is not None:
        violations.add(field, problem, reason="INVALID_TEXT")


def check_mask_paths(
    mask: Sequence[str], updatable: Sequence[str], violations: FieldViolations
) -> None:
    """Record a violation for each ``update_mask.paths[i]`` that names no updatable field."""
    for index, path in enumerate(mask):
        if path not in updatable:
            violations.add(
                f"update_mask.paths[{index}]",
                f"{path[:64]!r} cannot be updated (only {', '.join(updatable)})",
                reason="INVALID_MASK",
            )


def external_id_problem(value: str) -> str | None:
    """What makes ``value`` unacceptable as an external id or alias value, or None.

    The rules of :func:`check_external_id`, for callers that build the field path only when
    there is a problem.
    """
    if not value.strip():
        return "must not be empty"
    if is_placeholder_id(value):
        return f"{value.strip()!r} is a placeholder, not an id"
    if value != value.strip():
        return "must not start or end with whitespace"
    return text_problem(value, max_length=MAX_ID_LENGTH)


def check_external_id(value: str, field: str, violations: FieldViolations) -> None:
    """Record a violation for ``field`` unless ``value`` is an acceptable external id.

    Refused: empty and whitespace-only values, placeholders (:func:`is_placeholder_id`), values
    with surrounding whitespace or control characters, and values over :data:`MAX_ID_LENGTH`
    characters. The same rules apply to alias values.

    Args:
        value: The external id.
        field: Its path in the request (``user.external_id``).
        violations: Where to record the problem.
    """
    problem = external_id_problem(value)
    if problem is not None:
        violations.add(field, problem, reason="INVALID_ID")


def check_alias_label(label: str, field: str, violations: FieldViolations) -> None:
    """Record a violation for ``field`` unless ``label`` is an acceptable alias label.

    A label is lowercase ASCII letters, digits and ``_``, starting with a letter, at most
    :data:`MAX_ALIAS_LABEL_LENGTH` characters, and not one of :data:`RESERVED_ALIAS_LABELS`.

    Args:
        label: The alias label.
        field: Its path in the request (``alias.label``).
        violations: Where to record the problem.
    """
    if not label:
        violations.add(field, "must not be empty", reason="INVALID_ALIAS_LABEL")
    elif len(label) > MAX_ALIAS_LABEL_LENGTH:
        violations.add(
            field,
            f"must be at most {MAX_ALIAS_LABEL_LENGTH} characters",
            reason="INVALID_ALIAS_LABEL",
        )
    elif not ALIAS_LABEL_PATTERN.fullmatch(label):
        violations.add(
            field,
            "must be lowercase letters, digits and '_', starting with a letter",
            reason="INVALID_ALIAS_LABEL",
        )
    elif label in RESERVED_ALIAS_LABELS:
        violations.add(field, f"{label!r} is reserved", reason="RESERVED_ALIAS_LABEL")


def check_alias(label: str, value: str, field: str, violations: FieldViolations) -> None:
    """Record violations for ``field.label`` and ``field.value`` of an alias.

    Args:
        label: The alias label.
        value: The alias value (the id rules of :func:`check_external_id` apply).
        field: Path of the alias in the request (``alias``, ``ref.alias``).
        violations: Where to record the problems.
    """
    check_alias_label(label, f"{field}.label", violations)
    check_external_id(value, f"{field}.value", violations)


def normalize_email(value: str) -> str:
    """The canonical form of an email address (domain lowercased, IDNA-normalised).

    Syntax only: no DNS lookups, so an address at a domain that does not exist passes.

    Raises:
        ValueError: If the address is not syntactically valid; the message says why.
    """
    if len(value) > MAX_EMAIL_LENGTH:
        raise ValueError(f"must be at most {MAX_EMAIL_LENGTH} characters")
    # Fast path for the plain ASCII addresses nearly everyone has: the full validator costs
    # tens of microseconds per address, which a 1,000-user batch would feel. Anything unusual
    # (Unicode, quoting, Punycode, special-use domains) takes the full path below.
    match = _PLAIN_EMAIL.fullmatch(value)
    if match is not None:
        local, domain = match.group("local"), match.group("domain").lower()
        if (
            len(local) <= _MAX_LOCAL_PART
            and "--" not in domain
            and domain.rpartition(".")[2] not in _SPECIAL_USE_TLDS
        ):
            return f"{local}@{domain}"
    try:
        result = email_validator.validate_email(value, check_deliverability=False)
    except email_validator.EmailNotValidError as exc:
        raise ValueError(f"not a valid email address: {exc}") from None
    return str(result.normalized)


def normalize_phone(value: str) -> str:
    """The E.164 form of a phone number given in international form (``+34 600 111 222``).

    Spaces, dots, dashes and parentheses between digits are accepted and dropped; the number
    must start with ``+`` and its country code, and be a valid number for that country.

    Raises:
        ValueError: If it is not a valid international phone number.
    """
    if phones.plain_e164_is_valid(value):
        return value
    # Anything else, even plain E.164 refused by the fast rule: the parser may still read it
    # (national prefix rules), and says why not.
    if not _PHONE_CHARS.fullmatch(value):
        raise ValueError("must be an E.164 phone number such as +34600111222")
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException:
        raise ValueError("must be an E.164 phone number such as +34600111222") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("not a valid phone number for its country code")
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


@functools.cache
def _zones_by_folded_name() -> dict[str, str]:
    """Every IANA zone name zoneinfo can load, by its casefolded form."""
    names = zoneinfo.available_timezones() - _NOT_ZONES
    # Some systems also ship the "posix/" and "right/" trees; they are not IANA names.
    return {name.casefold(): name for name in names if not name.startswith(("posix/", "right/"))}


def normalize_timezone(value: str) -> str:
    """The canonical spelling of an IANA time zone name (``europe/madrid`` → ``Europe/Madrid``).

    The name is looked up in the list of zones rather than opened with ``ZoneInfo`` directly:
    ``ZoneInfo`` also opens ``localtime`` (the host's zone), ``Factory``, and on
    case-insensitive file systems any casing, and the answer would differ between machines.

    Raises:
        ValueError: If it is not an IANA zone name.
    """
    name = _zones_by_folded_name().get(value.casefold())
    if name is None:
        raise ValueError(f"{value!r} is not an IANA time zone name such as 'Europe/Madrid'")
    return name


def normalize_language(value: str) -> str:
    """The canonical form of a language tag: ISO 639-1, optional script and region.

    ``es``, ``pt_br`` → ``pt-BR``, ``zh-hant-tw`` → ``zh-Hant-TW``, ``es-419``.

    Raises:
        ValueError: If the language is not an ISO 639-1 code, or the region not an ISO 3166
            alpha-2 code or a UN M.49 number.
    """
    match = _LANGUAGE.fullmatch(value)
    if match is None:
        raise ValueError("must be an ISO 639-1 language code with an optional region: 'pt-BR'")
    lang, script, region = match.group("lang", "script", "region")
    lang = lang.lower()
    if lang not in ISO_639_1:
        raise ValueError(f"{lang!r} is not an ISO 639-1 language code")
    parts = [lang]
    if script:
        parts.append(script.title())
    if region:
        region = region.upper()
        if not region.isdigit() and region not in ISO_3166_ALPHA2:
            raise ValueError(f"{region!r} is not an ISO 3166 country code")
        parts.append(region)
    return "-".join(parts)


def normalize_country(value: str) -> str:
    """The canonical (upper-case) ISO 3166-1 alpha-2 country code.

    Raises:
        ValueError: If it is not an assigned alpha-2 code.
    """
    code = value.upper()
    if code not in ISO_3166_ALPHA2:
        raise ValueError(f"{value!r} is not an ISO 3166-1 alpha-2 country code such as 'ES'")
    return code


def _checked(
    normalize: Callable[[str], str],
    value: str,
    field: str,
    violations: FieldViolations,
    reason: str,
) -> str | None:
    try:
        return normalize(value)
    except ValueError as exc:
        violations.add(field, str(exc), reason=reason)
        return None


def check_email(value: str, field: str, violations: FieldViolations) -> str | None:
    """:func:`normalize_email`, recording a violation for ``field`` instead of raising.

    Returns:
        The normalised address, or None if it was refused.
    """
    return _checked(normalize_email, value, field, violations, "INVALID_EMAIL")


def check_phone(value: str, field: str, violations: FieldViolations) -> str | None:
    """:func:`normalize_phone`, recording a violation for ``field`` instead of raising.

    Returns:
        The E.164 number, or None if it was refused.
    """
    return _checked(normalize_phone, value, field, violations, "INVALID_PHONE")


def check_timezone(value: str, field: str, violations: FieldViolations) -> str | None:
    """:func:`normalize_timezone`, recording a violation for ``field`` instead of raising.

    Returns:
        The zone name, or None if it was refused.
    """
    return _checked(normalize_timezone, value, field, violations, "INVALID_TIMEZONE")


def check_language(value: str, field: str, violations: FieldViolations) -> str | None:
    """:func:`normalize_language`, recording a violation for ``field`` instead of raising.

    Returns:
        The language tag, or None if it was refused.
    """
    return _checked(normalize_language, value, field, violations, "INVALID_LANGUAGE")


def check_country(value: str, field: str, violations: FieldViolations) -> str | None:
    """:func:`normalize_country`, recording a violation for ``field`` instead of raising.

    Returns:
        The country code, or None if it was refused.
    """
    return _checked(normalize_country, value, field, violations, "INVALID_COUNTRY")


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: ISO 639-1 two-letter language codes.
ISO_639_1 = _words(
    """
    aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv
    cy da de dv dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr
    ht hu hy hz ia id ie ig ii ik io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw
    ky la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na nb nd ne ng nl nn no nr nv
    ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq sr
    ss st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi
    yo za zh zu
    """
)

#: ISO 3166-1 alpha-2 codes of the 249 assigned countries and territories.
ISO_3166_ALPHA2 = _words(
    """
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ
    BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM
    DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS
    GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN
    KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ
    MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM
    PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV
    SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI
    VN VU WF WS YE YT ZA ZM ZW
    """
)
