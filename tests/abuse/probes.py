"""Deterministic probes: one request per RPC with every field of a kind set to one bad value.

Where the random requests of test_fuzz_requests.py found a class of bad input that crashes a
handler, a probe pins it down on every RPC, the same way on every run: every string field a NUL,
every string field too long for a file name, every Timestamp and Duration out of range.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

F = FieldDescriptor
_WELL_KNOWN_STOP = {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}
TIME_TYPES = {"google.protobuf.Timestamp", "google.protobuf.Duration"}

Setter = Callable[[Any, FieldDescriptor], bool]


def _fill(message: Any, descriptor: Descriptor, setter: Setter, depth: int) -> bool:
    """Apply ``setter`` to every field it wants, recursing into messages; True if any was set."""
    touched = False
    done_oneofs: set[str] = set()
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is not None and oneof.name in done_oneofs:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            continue
        if field.message_type is not None and field.message_type.full_name not in TIME_TYPES:
            if depth >= 3 or field.message_type.full_name in _WELL_KNOWN_STOP:
                continue
            child = getattr(message, field.name).add() if field.is_repeated else None
            target = child if child is not None else getattr(message, field.name)
            if _fill(target, field.message_type, setter, depth + 1):
                touched = True
                if oneof is not None:
                    done_oneofs.add(oneof.name)
            elif child is not None:
                del getattr(message, field.name)[-1]
            else:
                message.ClearField(field.name)
            continue
        if setter(message, field):
            touched = True
            if oneof is not None:
                done_oneofs.add(oneof.name)
    return touched


def probe(descriptor: Descriptor, setter: Setter) -> Message | None:
    """A request of ``descriptor``'s type with ``setter`` applied everywhere; None if no field
    takes it."""
    message: Any = message_factory.GetMessageClass(descriptor)()
    return message if _fill(message, descriptor, setter, 0) else None


def strings(value: str) -> Setter:
    """Every string field (repeated ones get one item) becomes ``value``."""

    def setter(message: Any, field: FieldDescriptor) -> bool:
        if field.type != F.TYPE_STRING:
            return False
        if field.is_repeated:
            getattr(message, field.name).append(value)
        else:
            setattr(message, field.name, value)
        return True

    return setter


def out_of_range_times(message: Any, field: FieldDescriptor) -> bool:
    """Every Timestamp and Duration becomes one whose seconds are out of range."""
    if field.message_type is None or field.message_type.full_name not in TIME_TYPES:
        return False
    target = (
        getattr(message, field.name).add() if field.is_repeated else getattr(message, field.name)
    )
    target.seconds = 2**63 - 1
    target.nanos = -1
    return True
