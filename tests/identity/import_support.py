"""Helpers of the import tests: options, uploads in chunks, reading what an import wrote."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING

from tidings.identity.v1 import identity_service_pb2 as pb
from tidings.identity.v1 import import_pb2, user_pb2
from tidings.identity.v1 import subscription_pb2 as spb

from tests.identity.conftest import TestApp
from tests.identity.support import ext

if TYPE_CHECKING:
    from tidings.identity.v1.identity_service_pb2_grpc import IdentityServiceAsyncStub

Options = import_pb2.ImportOptions
Column = import_pb2.ImportColumn
Attribute = import_pb2.ImportAttribute
Job = import_pb2.ImportJob

EXTERNAL_ID = Options.IDENTIFIER_KIND_EXTERNAL_ID
ALIAS = Options.IDENTIFIER_KIND_ALIAS
USER_ID = Options.IDENTIFIER_KIND_USER_ID
STRING = Attribute.TYPE_STRING
NUMBER = Attribute.TYPE_NUMBER
BOOL = Attribute.TYPE_BOOL
DATE = Attribute.TYPE_DATE
TIMESTAMP = Attribute.TYPE_TIMESTAMP


def standard(column: str, field: str | None = None, date_format: str = "") -> Column:
    """A column filling a standard field (of the column's name by default)."""
    return Column(column=column, standard_field=field or column, date_format=date_format)


def attribute(
    column: str, type_: import_pb2.ImportAttribute.Type.ValueType, name: str = "", fmt: str = ""
) -> Column:
    """A column filling a custom attribute (of the column's name by default)."""
    return Column(
        column=column,
        attribute=import_pb2.ImportAttribute(name=name or column, type=type_),
        date_format=fmt,
    )


def subscription(column: str, type_: spb.SubscriptionType.ValueType) -> Column:
    """A column holding subscription addresses or tokens."""
    return Column(column=column, subscription=import_pb2.ImportSubscription(type=type_))


def options(*columns: Column, id_column: str = "id", **fields: object) -> Options:
    """Options with an external-id identifier column ``id`` unless told otherwise."""
    values: dict[str, object] = {"identifier_column": id_column, "identifier_kind": EXTERNAL_ID}
    values.update(fields)
    return Options(columns=list(columns), **values)  # type: ignore[arg-type]


def csv_bytes(rows: Iterable[Iterable[str]], *, newline: str = "\r\n") -> bytes:
    """Rows joined naively (callers quote cells themselves)."""
    return "".join(",".join(row) + newline for row in rows).encode()


async def _requests(
    opts: Options, data: bytes, chunk: int
) -> AsyncIterator[import_pb2.ImportUsersRequest]:
    yield import_pb2.ImportUsersRequest(options=opts)
    for start in range(0, len(data), chunk):
        yield import_pb2.ImportUsersRequest(chunk=data[start : start + chunk])


async def upload(
    stub: IdentityServiceAsyncStub, app: TestApp, opts: Options, data: bytes, *, chunk: int = 7
) -> Job:
    """ImportUsers with ``data`` sent in ``chunk``-byte pieces (small: records span chunks)."""
    job: Job = await stub.ImportUsers(_requests(opts, data, chunk), metadata=app.server)
    return job


def assert_counts_add_up(job: Job) -> None:
    """The rule every finished job obeys."""
    assert job.rows == job.created + job.updated + job.unchanged + job.rejected, job


def rejections_by_line(job: Job) -> dict[int, tuple[str, str]]:
    """``line → (reason, column)`` of a job's rejections."""
    return {r.line: (r.reason, r.column) for r in job.rejections}


async def user(stub: IdentityServiceAsyncStub, app: TestApp, external_id: str) -> user_pb2.User:
    """The whole profile of ``external_id``."""
    found: user_pb2.User = await stub.GetUser(
        pb.GetUserRequest(ref=ext(external_id)), metadata=app.server
    )
    return found
