"""List paging (AIP-158): page sizes and opaque page tokens, the same for every List method.

A page token names the list it belongs to (``"users"``, ``"apps"``, or a name that also pins
the query's filters), so a token of one list is refused by another instead of silently
skipping or repeating items. Its position is a few string fields the list chooses::

    from services.runtime import paging

    limit = paging.page_size(request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
    after = paging.decode_page_token("users", request.page_token) if request.page_token else None
    ...
    next_token = paging.encode_page_token("users", {"t": last.create_time.isoformat()})

A list that cannot use a decoded position (a field missing or malformed) raises
:func:`bad_page_token`, so every forged or foreign token gets the same answer.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping

from services.runtime.errors import FieldViolation, FieldViolations, InvalidArgument

__all__ = ["bad_page_token", "decode_page_token", "encode_page_token", "page_size"]


def page_size(requested: int, *, default: int, maximum: int, field: str = "page_size") -> int:
    """The number of items to serve for a requested page size.

    0 means ``default``; more than ``maximum`` is served ``maximum`` (AIP-158 coerces, it does
    not refuse).

    Raises:
        InvalidArgument: Naming ``field`` if ``requested`` is negative.
    """
    if requested < 0:
        violations = FieldViolations()
        violations.add(field, "must not be negative", reason="OUT_OF_RANGE")
        violations.raise_if_any()
    return min(requested or default, maximum)


def encode_page_token(list_name: str, position: Mapping[str, str]) -> str:
    """An opaque token for ``position`` (the last item served) in the list ``list_name``."""
    payload = json.dumps({"k": list_name, **position}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


def decode_page_token(list_name: str, token: str, field: str = "page_token") -> dict[str, str]:
    """The position a token from :func:`encode_page_token` for ``list_name`` stands for.

    Raises:
        InvalidArgument: Naming ``field`` if the token was not made by us for this list.
    """
    try:
        padded = token + "=" * (-len(token) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if (
            isinstance(payload, dict)
            and payload.pop("k", None) == list_name
            and all(isinstance(value, str) for value in payload.values())
        ):
            return payload
    except (ValueError, binascii.Error, UnicodeDecodeError):
        # ValueError covers bad JSON too (JSONDecodeError).
        pass
    raise bad_page_token(field)


def bad_page_token(field: str = "page_token") -> InvalidArgument:
    """The error for a page token that is not from a previous answer of the same list."""
    return InvalidArgument(
        "the page token is not from a previous answer of this method",
        reason="INVALID_PAGE_TOKEN",
        field_violations=[FieldViolation(field, "not a page token from this list")],
    )
