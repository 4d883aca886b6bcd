"""Fan-out records (``tidings.events.v1.SendRequest``): building them and reading them back.

A record is self-sufficient: app, recipient (a user id, or a ref the worker resolves), the
idempotency key, the message id, which dispatch it is, and the spec (or the broadcast whose
spec applies). Journeys write the older, flat form (``template_id``, ``channels``,
``trigger_properties``, ``journey_id``...), which :func:`spec_of` turns into a spec.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf import struct_pb2, timestamp_pb2
from tidings.delivery.v1 import message_pb2
from tidings.events.v1.send_request_pb2 import SendRequest
from tidings.identity.v1 import user_ref_pb2

from services.delivery import channels

__all__ = ["Job", "derive_message_id", "record_key", "spec_of"]

_NAMESPACE = uuid.UUID("0b8f9c64-5d0e-4c7e-a6a4-1f2e3d4c5b6a")


_TIMES: dict[tuple[int, int], datetime] = {}


def _time(stamp: timestamp_pb2.Timestamp) -> datetime:
    # Timestamp.ToDatetime is pure Python and shows in profiles at thousands of records/s; the
    # records of a broadcast page share their times, so converting each once is enough.
    key = (stamp.seconds, stamp.nanos)
    found = _TIMES.get(key)
    if found is None:
        if len(_TIMES) >= 4096:
            _TIMES.clear()
        found = _TIMES[key] = datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, UTC)
    return found


def derive_message_id(app_id: str, idempotency_key: str) -> uuid.UUID:
    """The message id of a job that names none: stable per (app, key)."""
    return uuid.uuid5(_NAMESPACE, f"{app_id}\0{idempotency_key}")


def ref_key(ref: user_ref_pb2.UserRef) -> str:
    """A stable string for a ref (record key, ledger key) when the user id is not known."""
    kind = ref.WhichOneof("ref")
    if kind == "alias":
        return f"alias:{ref.alias.label}:{ref.alias.value}"
    if kind is None:
        return ""
    return f"{kind}:{getattr(ref, kind)}"


def record_key(request: SendRequest) -> str:
    """The Kafka key: the user id, or the ref's value until the user is resolved."""
    return request.user_id or ref_key(request.user)


def spec_of(request: SendRequest) -> message_pb2.MessageSpec | None:
    """The spec a record carries (None: it is its broadcast's)."""
    if request.HasField("spec"):
        spec = message_pb2.MessageSpec()
        spec.CopyFrom(request.spec)
    elif request.template_id:
        spec = message_pb2.MessageSpec()
        names = [channels.channel_from_name(name) for name in request.channels] or [None]
        for name in names:
            option = spec.options.add(template_id=request.template_id)
            if name is not None:
                option.channel = channels.channel_proto(name)  # type: ignore[assignment]
        if request.HasField("trigger_properties"):
            spec.event_properties.CopyFrom(request.trigger_properties)
        if request.journey_id:
            spec.journey.update(
                {"journey_id": request.journey_id, "node_id": request.journey_node_id}
            )
    else:
        return None
    return with_record_data(spec, request)


def with_record_data(
    spec: message_pb2.MessageSpec, request: SendRequest
) -> message_pb2.MessageSpec:
    """``spec`` with the record's per-user ``data`` merged over its own (a copy if changed)."""
    if not request.HasField("data"):
        return spec
    out = message_pb2.MessageSpec()
    out.CopyFrom(spec)
    merged = struct_pb2.Struct()
    merged.CopyFrom(spec.data)
    merged.update(dict(request.data.items()))
    out.data.CopyFrom(merged)
    return out


@dataclass(slots=True)
class Job:
    """One record, read."""

    request: SendRequest
    app_id: str
    message_id: uuid.UUID
    idempotency_key: str
    dispatch: int
    broadcast_id: uuid.UUID | None
    expire_at: datetime | None
    requested_at: datetime

    @classmethod
    def read(cls, request: SendRequest, received_at: datetime) -> Job | None:
        """The job of a record; None when it names no app or no recipient."""
        if not request.app_id or (not request.user_id and request.user.WhichOneof("ref") is None):
            return None
        key = request.idempotency_key or request.event_id
        if not key:
            return None
        try:
            message_id = (
                uuid.UUID(request.message_id)
                if request.message_id
                else derive_message_id(request.app_id, key)
            )
            broadcast_id = uuid.UUID(request.broadcast_id) if request.broadcast_id else None
        except ValueError:
            return None
        expire_at = _time(request.expire_time) if request.HasField("expire_time") else None
        requested_at = (
            _time(request.occurred_at) if request.HasField("occurred_at") else received_at
        )
        return cls(
            request=request,
            app_id=request.app_id,
            message_id=message_id,
            idempotency_key=key,
            dispatch=request.dispatch,
            broadcast_id=broadcast_id,
            expire_at=expire_at,
            requested_at=requested_at,
        )

    @property
    def ref(self) -> user_ref_pb2.UserRef:
        """How to ask identity for the recipient."""
        if self.request.user_id:
            return user_ref_pb2.UserRef(user_id=self.request.user_id)
        return self.request.user
