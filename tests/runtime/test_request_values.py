"""Request values PostgreSQL or datetime cannot hold are named by field path."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from tidings.identity.v1 import identity_service_pb2 as pb
from tidings.identity.v1 import user_pb2

from services.runtime.errors import InvalidArgument
from services.runtime.request_values import nul_character_error, to_datetime


def test_nul_paths_name_nested_repeated_and_map_fields() -> None:
    request = pb.BatchUpsertUsersRequest(
        requests=[
            pb.UpsertUserRequest(user=user_pb2.User(first_name="fine")),
            pb.UpsertUserRequest(user=user_pb2.User(first_name="a\x00b", last_name="ok")),
        ]
    )
    request.requests[0].user.attributes["k\x00"].string_value = "v"
    request.requests[1].user.attributes["plan"].string_value = "x\x00"
    error = nul_character_error(request)
    assert error.reason == "NUL_CHARACTER"
    assert sorted(v.field for v in error.field_violations) == [
        "requests[0].user.attributes['k\\x00']",
        "requests[1].user.attributes['plan'].string_value",
        "requests[1].user.first_name",
    ]


def test_nul_error_of_a_stream_names_no_field() -> None:
    error = nul_character_error(iter([]))
    assert error.field_violations == ()
    assert "NUL" in error.message


def test_to_datetime_refuses_what_datetime_cannot_hold() -> None:
    assert to_datetime(Timestamp(seconds=0, nanos=1_000), "t") == datetime(
        1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC
    )
    for stamp in (Timestamp(seconds=2**62), Timestamp(seconds=0, nanos=-1)):
        with pytest.raises(InvalidArgument) as caught:
            to_datetime(stamp, "start_time")
        assert [v.field for v in caught.value.field_violations] == ["start_time"]
