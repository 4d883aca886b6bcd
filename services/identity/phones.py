"""libphonenumber's validity rule for numbers already in plain E.164 form, compiled once.

``phonenumbers.parse`` + ``is_valid_number`` cost tens of microseconds (a dozen pattern look-ups
through Python per call), which a 1,000-user batch or a million-row import feels.
:func:`plain_e164_is_valid` runs the same rule (the region, then the general pattern and one of
the number-type patterns, with their possible lengths) over the same metadata with the
patterns compiled once. It only ever says yes for numbers the full parser accepts unchanged;
``validation.normalize_phone`` sends everything else (and every "no") to the full parser, which
decides and says why.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import phonenumbers
from phonenumbers.phonemetadata import PhoneMetadata

__all__ = ["PLAIN_E164", "plain_e164_is_valid"]

#: Plain E.164: "+", then a country code and a national number, digits only.
PLAIN_E164 = re.compile(r"\+([1-9][0-9]{6,14})")
_NON_GEO = phonenumbers.REGION_CODE_FOR_NON_GEO_ENTITY


@dataclass(frozen=True, slots=True)
class _Desc:
    lengths: frozenset[int]
    pattern: re.Pattern[str]

    def matches(self, number: str) -> bool:
        # libphonenumber: the possible lengths first (none listed: any), then the pattern.
        if self.lengths and len(number) not in self.lengths:
            return False
        return self.pattern.fullmatch(number) is not None


@dataclass(frozen=True, slots=True)
class _Region:
    general: _Desc
    types: tuple[_Desc, ...]
    leading_digits: re.Pattern[str] | None

    def valid(self, number: str) -> bool:
        """``_number_type_helper(number) != UNKNOWN``."""
        return self.general.matches(number) and any(desc.matches(number) for desc in self.types)


def _desc(desc: object) -> _Desc | None:
    pattern = getattr(desc, "national_number_pattern", None)
    if not pattern:
        return None
    return _Desc(frozenset(getattr(desc, "possible_length", ()) or ()), re.compile(pattern))


@functools.cache
def _region(country_code: int, region_code: str) -> _Region | None:
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(country_code, region_code)
    if metadata is None:
        return None
    general = _desc(metadata.general_desc)
    if general is None:
        return None
    names = (
        "premium_rate",
        "toll_free",
        "shared_cost",
        "voip",
        "personal_number",
        "pager",
        "uan",
        "voicemail",
        "fixed_line",
        "mobile",
    )
    # The type patterns grouped by their possible lengths, one alternation per group: one
    # regex run instead of ten (any type matching makes the number valid).
    grouped: dict[frozenset[int], list[str]] = {}
    for desc in (_desc(getattr(metadata, name, None)) for name in names):
        if desc is not None:
            grouped.setdefault(desc.lengths, []).append(desc.pattern.pattern)
    types = tuple(
        _Desc(lengths, re.compile("|".join(f"(?:{p})" for p in patterns)))
        for lengths, patterns in grouped.items()
    )
    leading = re.compile(metadata.leading_digits) if metadata.leading_digits else None
    return _Region(general, types, leading)


def _region_of(country_code: int, regions: Sequence[str], number: str) -> str | None:
    """``region_code_for_number``: the only region, or the first whose leading digits match
    (or, without leading digits, for which the number is valid)."""
    if len(regions) == 1:
        return regions[0]
    for code in regions:
        region = _region(country_code, code)
        if region is None:
            continue
        if region.leading_digits is not None:
            if region.leading_digits.match(number):
                return code
        elif region.valid(number):
            return code
    return None


def _never(number: str) -> bool:
    return False


@functools.cache
def _validator(country_code: int) -> Callable[[str], bool]:
    """``is_valid_number`` for one country code, resolved once: most codes have one region."""
    regions = phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(country_code)
    if not regions:
        return _never
    if len(regions) > 1:
        return functools.partial(_valid_in_one_of, country_code, regions)
    region = _checked_region(country_code, regions[0])
    return region.valid if region is not None else _never


def _checked_region(country_code: int, code: str) -> _Region | None:
    """The region, if numbers of ``country_code`` can be valid in it."""
    if code != _NON_GEO and phonenumbers.country_code_for_valid_region(code) != country_code:
        return None
    return _region(country_code, code)


def _valid_in_one_of(country_code: int, regions: Sequence[str], number: str) -> bool:
    code = _region_of(country_code, regions, number)
    region = _checked_region(country_code, code) if code is not None else None
    return region is not None and region.valid(number)


@functools.lru_cache(maxsize=1024)
def _country_code_length(prefix: str) -> int:
    """How many of the first digits of an E.164 number are its country code (0: none)."""
    for length in (1, 2, 3):
        if int(prefix[:length]) in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            return length
    return 0


def plain_e164_is_valid(value: str) -> bool:
    """Whether ``value``, in plain E.164 form, is a valid number as written.

    False means "not decided here" as much as "invalid": numbers with a national part starting
    with 0, or that need the parser's national-prefix rules, take the full parser.
    """
    plain = PLAIN_E164.fullmatch(value)
    if plain is None:
        return False
    digits = plain.group(1)
    length = _country_code_length(digits[:3])
    if not length:
        return False
    national = digits[length:]
    return national[0] != "0" and _validator(int(digits[:length]))(national)
