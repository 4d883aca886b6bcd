"""Hypothesis strategies that build any protobuf message from its descriptor.

Every field may be left unset or get a random value of its type: strings from a mix of random
text and nasty classics (empty, NUL, huge, path traversal, SQL, template tags, ids that look
real), integers over the whole range of the wire type, NaN and infinities for floats, enum
numbers the schema never declared, repeated and map fields, one member of each oneof, nested
messages to a bounded depth (Struct, Timestamp, Duration, FieldMask included, generically, so
an out-of-range Timestamp is generated too).
"""

from __future__ import annotations

import uuid
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

F = FieldDescriptor
MAX_DEPTH = 4

_NASTY = [
    "",
    " ",
    "\x00",
    "\x00abc",
    "a" * 300,
    "é" * 2000,
    "x" * 70_000,
    "../../etc/passwd",
    "'; DROP TABLE users; --",
    "{{ 7 | times: 7 }}",
    "{% for x in (1..100000000) %}{% endfor %}",
    "users/*",
    "%s%n%x",
    "\U0001f600" * 10,
    "\u202e\u0000\ufeff",
    "null",
    "true",
    "-1",
    "9" * 40,
    "00000000-0000-0000-0000-000000000000",
    str(uuid.UUID(int=1)),
    "http://169.254.169.254/",
    "=cmd|' /C calc'!A0",
    "attributes.plan",
    "first_name",
]

_INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}


def text() -> st.SearchStrategy[str]:
    """Random text, and the nasty classics."""
    return st.one_of(st.sampled_from(_NASTY), st.text(max_size=40))


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from([0, 1, -1 if low < 0 else 2, low, high]),
        st.integers(min_value=max(low, -1000), max_value=min(high, 100_000)),
        st.integers(min_value=low, max_value=high),
    )


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INT_RANGES:
        return _integers(*_INT_RANGES[kind])
    if kind == F.TYPE_BOOL:
        return st.booleans()
    if kind == F.TYPE_STRING:
        return text()
    if kind == F.TYPE_BYTES:
        return st.one_of(st.binary(max_size=200), st.just(b"\xff\xfe\x00" * 1000))
    if kind == F.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if kind == F.TYPE_FLOAT:
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if kind == F.TYPE_ENUM:
        assert field.enum_type is not None
        declared = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(declared), st.integers(-3, 1000))
    raise AssertionError(f"no strategy for field type {kind} of {field.full_name}")


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


@st.composite
def messages(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> Message:
    """A random message of ``descriptor``'s type."""
    message: Any = message_factory.GetMessageClass(descriptor)()
    chosen_oneofs = {
        oneof.name: draw(st.sampled_from([None, *[f.name for f in oneof.fields]]))
        for oneof in descriptor.oneofs
    }
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is not None and chosen_oneofs.get(oneof.name) != field.name:
            continue
        if oneof is None and not draw(st.booleans()):
            continue
        if _is_map(field):
            entry = field.message_type
            assert entry is not None
            key_field = entry.fields_by_name["key"]
            value_field = entry.fields_by_name["value"]
            for key in draw(st.lists(_scalar(key_field), max_size=3)):
                if value_field.message_type is not None:
                    if depth < MAX_DEPTH:
                        getattr(message, field.name)[key].CopyFrom(
                            draw(messages(value_field.message_type, depth + 1))
                        )
                else:
                    getattr(message, field.name)[key] = draw(_scalar(value_field))
        elif field.message_type is not None:
            if depth >= MAX_DEPTH:
                continue
            if field.is_repeated:
                for item in draw(st.lists(messages(field.message_type, depth + 1), max_size=2)):
                    getattr(message, field.name).add().CopyFrom(item)
            else:
                getattr(message, field.name).CopyFrom(draw(messages(field.message_type, depth + 1)))
        elif field.is_repeated:
            getattr(message, field.name).extend(draw(st.lists(_scalar(field), max_size=3)))
        else:
            setattr(message, field.name, draw(_scalar(field)))
    return message  # type: ignore[no-any-return]
