"""Synthetic customer rows shaped like a CRM export: 10 columns of text, integers and a timestamp.

Rows are deterministic (row ``i`` is always the same) so runs are comparable. Low-cardinality
columns reuse a few string objects, which keeps a million rows in a few hundred MiB of client
memory without changing what the server receives.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

#: Column names, in the order of every row tuple.
CUSTOMER_COLUMNS: tuple[str, ...] = (
    "external_id",
    "email",
    "first_name",
    "last_name",
    "phone",
    "country",
    "language",
    "birth_year",
    "score",
    "signed_up_at",
)

#: Column definitions for a table holding these rows (no constraints: the caller adds any).
CUSTOMER_COLUMN_DDL = """
    external_id  text NOT NULL,
    email        text,
    first_name   text,
    last_name    text,
    phone        text,
    country      text,
    language     text,
    birth_year   integer,
    score        bigint,
    signed_up_at timestamptz
"""

CustomerRow = tuple[str, str, str, str, str, str, str, int, int, datetime]

_FIRST = ("Ana", "Luis", "Marta", "Jordi", "Aisha", "Chen", "Olga", "Kwame", "Sofia", "Pablo")
_LAST = ("García", "Smith", "Müller", "Rossi", "Novak", "Okafor", "Tanaka", "Silva", "Dubois")
_COUNTRIES = ("ES", "US", "DE", "IT", "CZ", "NG", "JP", "BR", "FR", "MX", "GB", "IN")
_LANGUAGES = ("es", "en", "de", "it", "cs", "en", "ja", "pt", "fr", "es", "en", "hi")
_EPOCH = datetime(2020, 1, 1, tzinfo=UTC)
# A pool of sign-up times (one per ~hour over 4 years) instead of a datetime object per row.
_SIGNUPS = tuple(_EPOCH + timedelta(minutes=61 * k) for k in range(35_000))


def customer_row(i: int, generation: int = 0) -> CustomerRow:
    """Customer number ``i``.

    Args:
        i: Row number; gives a unique ``external_id``, ``email`` and ``phone``.
        generation: Changes the mutable columns (email, score) so that writing generation 1
            over generation 0 is a real update.

    Returns:
        A tuple in :data:`CUSTOMER_COLUMNS` order.
    """
    return (
        f"cust-{i:09d}",
        f"user{i}.{generation}@example.com",
        _FIRST[i % len(_FIRST)],
        _LAST[(i // 7) % len(_LAST)],
        f"+3460{i % 10_000_000:07d}",
        _COUNTRIES[i % len(_COUNTRIES)],
        _LANGUAGES[i % len(_LANGUAGES)],
        1950 + i % 60,
        (i * 7919 + generation) % 1_000_003,
        _SIGNUPS[i % len(_SIGNUPS)],
    )


def customer_rows(indexes: range, generation: int = 0) -> list[CustomerRow]:
    """Many customers at once.

    Args:
        indexes: Which row numbers.
        generation: See :func:`customer_row`.

    Returns:
        The rows, in ``indexes`` order.
    """
    return [customer_row(i, generation) for i in indexes]
