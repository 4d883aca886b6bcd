"""Domain errors and their google.rpc.Status form (AIP-193)."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from services.runtime.errors import (
    Aborted,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    FieldViolations,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    to_status_proto,
)


@pytest.mark.parametrize(
    ("error_type", "code"),
    [
        (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound, grpc.StatusCode.NOT_FOUND),
        (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
        (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
        (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
        (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
        (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Aborted, grpc.StatusCode.ABORTED),
        (Unavailable, grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_each_error_knows_its_code(error_type: type[DomainError], code: grpc.StatusCode) -> None:
    error = error_type("something", reason="SOMETHING")
    assert isinstance(error, DomainError)
    assert error.code is code
    assert to_status_proto(error, domain="identity").code == code.value[0]


@pytest.mark.parametrize("reason", ["user_not_found", "UserNotFound", "USER-NOT-FOUND", "", "X_"])
def test_reason_must_be_upper_snake(reason: str) -> None:
    with pytest.raises(ValueError, match="UPPER_SNAKE"):
        NotFound("no such user", reason=reason)


def _details(status: object) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.BadRequest]:
    info = error_details_pb2.ErrorInfo()
    bad_request = error_details_pb2.BadRequest()
    for detail in status.details:  # type: ignore[attr-defined]
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(bad_request.DESCRIPTOR):
            detail.Unpack(bad_request)
        else:
            raise AssertionError(f"unexpected detail {detail.type_url}")
    return info, bad_request


def test_status_carries_error_info() -> None:
    error = NotFound("user 'u1' not found", reason="USER_NOT_FOUND", metadata={"user_id": "u1"})
    status = to_status_proto(error, domain="identity")
    assert status.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert status.message == "user 'u1' not found"
    info, bad_request = _details(status)
    assert info.reason == "USER_NOT_FOUND"
    assert info.domain == "identity"
    assert dict(info.metadata) == {"user_id": "u1"}
    assert not bad_request.field_violations
    assert len(status.details) == 1


def test_field_violations_name_every_bad_field() -> None:
    violations = FieldViolations()
    assert not violations
    violations.raise_if_any()  # nothing recorded: no error

    violations.add("user.email", "not a valid email address")
    violations.add("user.time_zone", "not an IANA time zone", reason="UNKNOWN_TIME_ZONE")
    violations.add("user.email", "longer than 320 characters")
    assert len(violations) == 3

    with pytest.raises(InvalidArgument) as raised:
        violations.raise_if_any()
    error = raised.value
    assert error.reason == "INVALID_FIELDS"
    assert error.message == "invalid request: user.email, user.time_zone"
    assert error.field_violations == (
        FieldViolation("user.email", "not a valid email address"),
        FieldViolation("user.time_zone", "not an IANA time zone", "UNKNOWN_TIME_ZONE"),
        FieldViolation("user.email", "longer than 320 characters"),
    )

    _, bad_request = _details(to_status_proto(error, domain="identity"))
    assert [(v.field, v.description, v.reason) for v in bad_request.field_violations] == [
        ("user.email", "not a valid email address", ""),
        ("user.time_zone", "not an IANA time zone", "UNKNOWN_TIME_ZONE"),
        ("user.email", "longer than 320 characters", ""),
    ]


def test_raise_if_any_takes_a_message_and_reason() -> None:
    violations = FieldViolations()
    violations.add("page_size", "must not be negative")
    with pytest.raises(InvalidArgument, match="bad page") as raised:
        violations.raise_if_any("bad page", reason="INVALID_PAGE")
    assert raised.value.reason == "INVALID_PAGE"


def test_a_later_add_does_not_change_a_raised_error() -> None:
    violations = FieldViolations()
    violations.add("a", "bad")
    with pytest.raises(InvalidArgument) as raised:
        violations.raise_if_any()
    violations.add("b", "bad too")
    assert [v.field for v in raised.value.field_violations] == ["a"]
