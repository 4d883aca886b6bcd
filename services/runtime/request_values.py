"""Request values PostgreSQL or ``datetime`` cannot hold, named by their field path.

Handlers validate what their domain knows; two limits apply to every request and are easy to
miss: PostgreSQL text and jsonb cannot store U+0000, and a ``google.protobuf.Timestamp`` may
hold moments ``datetime`` cannot (years outside 1-9999, nanos out of range).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from services.runtime.errors import FieldViolation, InvalidArgument

#: 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z, the range of both Timestamp and datetime.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799


def to_datetime(stamp: Timestamp, field: str) -> datetime:
    """``stamp`` as an aware UTC datetime.

    Args:
        stamp: A request's timestamp.
        field: Its path, for the error.

    Returns:
        The moment, to the microsecond.

    Raises:
        InvalidArgument: ``stamp`` is outside years 1-9999 or its nanos are out of range.
    """
    if not (_MIN_SECONDS <= stamp.seconds <= _MAX_SECONDS and 0 <= stamp.nanos < 1_000_000_000):
        raise InvalidArgument(
            f"{field} is not a valid point in time",
            reason="INVALID_TIMESTAMP",
            field_violations=[FieldViolation(field, "between years 1 and 9999, nanos < 1e9")],
        )
    return stamp.ToDatetime(tzinfo=UTC)


def nul_character_error(request: object) -> InvalidArgument:
    """The error for a request PostgreSQL refused because a text held U+0000.

    Args:
        request: The request message, or anything else for a streamed request (then no field
            can be named).

    Returns:
        INVALID_ARGUMENT naming every string field (map keys included) holding U+0000.
    """
    paths = list(_nul_paths(request, "")) if isinstance(request, Message) else []
    description = "contains a NUL character (U+0000), which cannot be stored"
    return InvalidArgument(
        "a text value contains a NUL character (U+0000), which cannot be stored",
        reason="NUL_CHARACTER",
        field_violations=[FieldViolation(path, description) for path in paths],
    )


def _nul_paths(message: Message, prefix: str) -> Iterator[str]:
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        entry = field.message_type
        if entry is not None:
            if entry.GetOptions().map_entry:
                value_field = entry.fields_by_name["value"]
                for key, item in value.items():
                    item_path = f"{path}[{key!r}]"
                    if isinstance(key, str) and "\x00" in key:
                        yield item_path
                    if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                        yield from _nul_paths(item, f"{item_path}.")
                    elif isinstance(item, str) and "\x00" in item:
                        yield item_path
            elif field.is_repeated:
                for index, item in enumerate(value):
                    yield from _nul_paths(item, f"{path}[{index}].")
            else:
                yield from _nul_paths(value, f"{path}.")
        elif field.type == FieldDescriptor.TYPE_STRING:
            if field.is_repeated:
                yield from (f"{path}[{i}]" for i, item in enumerate(value) if "\x00" in item)
            elif "\x00" in value:
                yield path
