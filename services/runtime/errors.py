"""The one hierarchy of domain errors, and how each becomes a rich gRPC status (AIP-193).

Domain code raises these and nothing gRPC-specific; the server interceptor is the single place
that turns them into a ``google.rpc.Status`` with an ``ErrorInfo`` (a machine-readable,
UPPER_SNAKE ``reason`` and the service as ``domain``) and, for bad requests, a ``BadRequest``
listing every invalid field, so a client can fix all of them in one round trip.

Example::

    violations = FieldViolations()
    if "@" not in user.email:
        violations.add("user.email", "not a valid email address")
    violations.raise_if_any()
    ...
    raise NotFound(f"user {user_id!r} not found", reason="USER_NOT_FOUND",
                   metadata={"user_id": user_id})
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "Aborted",
    "AlreadyExists",
    "DomainError",
    "FailedPrecondition",
    "FieldViolation",
    "FieldViolations",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "to_status_proto",
]

#: AIP-193: a reason is UPPER_SNAKE_CASE, at most 63 characters.
_REASON = re.compile(r"^[A-Z][A-Z0-9_]{0,61}[A-Z0-9]$")


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid field of a request.

    Attributes:
        field: Path to the field, dotted and with indexes as in AIP-193 (``users[2].email``).
        description: What is wrong, in words a developer can act on.
        reason: Optional UPPER_SNAKE code for this one violation (e.g. ``REQUIRED``).
    """

    field: str
    description: str
    reason: str = ""


class DomainError(Exception):
    """Base of every error a caller is meant to see; carries its gRPC code and details.

    Args:
        message: Developer-facing explanation; becomes the status message, so it must not
            contain secrets, SQL or internals.
        reason: UPPER_SNAKE_CASE machine-readable cause, unique within the service
            (``USER_NOT_FOUND``); clients branch on it rather than on the message.
        field_violations: Invalid request fields, sent as a ``BadRequest`` detail.
        metadata: Extra structured context for ``ErrorInfo.metadata`` (string values).

    Raises:
        ValueError: If ``reason`` is not UPPER_SNAKE_CASE (a programming error, caught by tests).
    """

    #: The gRPC status code this error maps to; every subclass sets its own.
    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        field_violations: Iterable[FieldViolation] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if not _REASON.match(reason):
            raise ValueError(f"error reason must be UPPER_SNAKE_CASE (AIP-193), got {reason!r}")
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.field_violations: tuple[FieldViolation, ...] = tuple(field_violations)
        self.metadata: dict[str, str] = dict(metadata or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"


class InvalidArgument(DomainError):
    """The request itself is wrong, whatever the state of the system (INVALID_ARGUMENT)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(DomainError):
    """The resource does not exist, or the caller's app may not know it does (NOT_FOUND)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(DomainError):
    """A create collided with an existing resource (ALREADY_EXISTS)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(DomainError):
    """The system is not in a state the request needs; retrying as-is will not help."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(DomainError):
    """No credentials, or credentials that identify nobody (UNAUTHENTICATED)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(DomainError):
    """The caller is known but its key may not do this (PERMISSION_DENIED)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(DomainError):
    """A quota or size limit was hit (RESOURCE_EXHAUSTED)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Aborted(DomainError):
    """A concurrency conflict (serialization failure, stale etag); retry the whole operation."""

    code = grpc.StatusCode.ABORTED


class Unavailable(DomainError):
    """A dependency is down or the service is starting or stopping; safe to retry with backoff."""

    code = grpc.StatusCode.UNAVAILABLE


class FieldViolations:
    """Collects every invalid field of a request so one error can name all of them.

    Example::

        violations = FieldViolations()
        violations.add("user.email", "not a valid email address")
        violations.raise_if_any()
    """

    def __init__(self) -> None:
        self._items: list[FieldViolation] = []

    def add(self, field: str, description: str, *, reason: str = "") -> None:
        """Record one invalid field.

        Args:
            field: Path to the field (``user.email``, ``users[3].external_id``).
            description: What is wrong with it.
            reason: Optional UPPER_SNAKE code for this violation.
        """
        self._items.append(FieldViolation(field, description, reason))

    def raise_if_any(self, message: str | None = None, *, reason: str = "INVALID_FIELDS") -> None:
        """Raise one ``InvalidArgument`` naming every recorded field, if any were recorded.

        Args:
            message: Status message; by default it lists the offending fields.
            reason: ``ErrorInfo.reason`` of the raised error.

        Raises:
            InvalidArgument: If at least one violation was added.
        """
        if not self._items:
            return
        if message is None:
            names = ", ".join(dict.fromkeys(item.field for item in self._items))
            message = f"invalid request: {names}"
        raise InvalidArgument(message, reason=reason, field_violations=self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Iterator[FieldViolation]:
        return iter(tuple(self._items))


def _pack(message: Any) -> Any:
    """Wrap a detail message in ``google.protobuf.Any``, as ``Status.details`` requires."""
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


def to_status_proto(error: DomainError, *, domain: str) -> Any:
    """Turn a domain error into the ``google.rpc.Status`` a client receives.

    Pair it with ``grpc_status.rpc_status.to_status`` and ``context.abort_with_status``; the
    client decodes it with ``grpc_status.rpc_status.from_call``.

    Args:
        error: The error to describe.
        domain: ``ErrorInfo.domain``: the service that raised it (``identity``).

    Returns:
        A ``google.rpc.status_pb2.Status`` with an ``ErrorInfo`` detail and, when the error
        names invalid fields, a ``BadRequest`` detail.
    """
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=domain)
    info.metadata.update(error.metadata)
    status.details.append(_pack(info))
    if error.field_violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=item.field, description=item.description, reason=item.reason
                )
                for item in error.field_violations
            ]
        )
        status.details.append(_pack(bad_request))
    return status
