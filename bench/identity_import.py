"""CSV import benchmark: a CRM export of customers uploaded through ImportUsers.

The file is :mod:`bench.data`'s customer rows (10 columns: external id, email, first and last
name, phone, country, language, birth year, score, sign-up time) written as CSV to a temporary
file. Figures:

* ``ceiling.pg_copy_csv_rows_per_s``: rows/s of a bare ``COPY ... FROM STDIN (FORMAT csv)`` of
  that same file into a table of the same 10 columns, no indexes: the server parses the CSV,
  nothing is checked. Measured in the same run.
* ``identity.csv_import_1m_s``: seconds from the first message of ImportUsers until its answer
  (the job SUCCEEDED, every user written with its change fact in the outbox), for the file
  streamed from disk in 1 MiB chunks into a real identity process on a scratch database. Every
  row creates a user (a fresh app): email, phone, names, country and language as standard
  fields, birth year and score as NUMBER attributes, sign-up time as a TIMESTAMP attribute.
* ``identity.csv_import_rows_per_s``: the same import as rows/s, divided by the ceiling.
* ``identity.csv_import_peak_rss_mb``: the identity process's peak RSS during the import
  (``VmHWM``, reset once the service is up), which shows the file is streamed, not held.

Like every figure here, the service, Postgres, Kafka and this client share the machine's cores.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc.aio
from tidings.identity.v1 import identity_service_pb2_grpc, import_pb2

from bench.context import Context
from bench.data import CUSTOMER_COLUMN_DDL, CUSTOMER_COLUMNS, customer_row
from bench.figure import Figure
from bench.identity import _create_app, _identity_on_scratch_db
from bench.measure import peak_rss_mb, reset_peak_rss
from bench.registry import benchmark

#: Bytes per ImportUsers chunk message.
CHUNK_BYTES = 1 << 20
#: Rows per write while generating the file.
_WRITE_ROWS = 50_000

_Column = import_pb2.ImportColumn
_Attribute = import_pb2.ImportAttribute


def _rows(ctx: Context) -> int:
    return ctx.sized(tiny=2_000, full=1_000_000)


def _csv_lines(count: int) -> Iterator[str]:
    yield ",".join(CUSTOMER_COLUMNS) + "\n"
    for i in range(count):
        external_id, email, first, last, phone, country, language, year, score, signed = (
            customer_row(i)
        )
        yield (
            f"{external_id},{email},{first},{last},{phone},{country},{language},{year},{score},"
            f"{signed.isoformat()}\n"
        )


@contextlib.contextmanager
def _csv_file(count: int) -> Iterator[Path]:
    """The benchmark's file (``count`` rows and a header) in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="bench-import-") as directory:
        path = Path(directory) / "customers.csv"
        with path.open("w", encoding="utf-8", newline="") as out:
            batch: list[str] = []
            for line in _csv_lines(count):
                batch.append(line)
                if len(batch) >= _WRITE_ROWS:
                    out.write("".join(batch))
                    batch.clear()
            out.write("".join(batch))
        yield path


@contextlib.asynccontextmanager
async def _file(ctx: Context) -> AsyncIterator[Path]:
    with _csv_file(_rows(ctx)) as path:
        yield path


@benchmark("ceiling.pg_copy_csv_rows_per_s")
async def pg_copy_csv_rows_per_s(ctx: Context) -> Figure:
    """Rows/s of a bare ``COPY FROM STDIN (FORMAT csv)`` of the import's file, no indexes."""
    count = _rows(ctx)
    async with _file(ctx) as path, ctx.scratch_database() as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"CREATE TABLE customers ({CUSTOMER_COLUMN_DDL})")
            start = time.perf_counter()
            await conn.copy_to_table(
                "customers", source=path, columns=list(CUSTOMER_COLUMNS), format="csv", header=True
            )
            seconds = time.perf_counter() - start
            copied = await conn.fetchval("SELECT count(*) FROM customers")
        finally:
            await conn.close()
    if copied != count:
        raise AssertionError(f"copied {copied} rows, expected {count}")
    ctx.log(f"  COPY of {count:,} CSV rows in {seconds:.2f} s")
    return Figure("ceiling.pg_copy_csv_rows_per_s", count / seconds, "rows/s")


def _options() -> import_pb2.ImportOptions:
    number, timestamp = _Attribute.TYPE_NUMBER, _Attribute.TYPE_TIMESTAMP
    return import_pb2.ImportOptions(
        identifier_column="external_id",
        identifier_kind=import_pb2.ImportOptions.IDENTIFIER_KIND_EXTERNAL_ID,
        columns=[
            *(
                _Column(column=name, standard_field=name)
                for name in ("email", "first_name", "last_name", "phone", "country", "language")
            ),
            _Column(column="birth_year", attribute=_Attribute(name="birth_year", type=number)),
            _Column(column="score", attribute=_Attribute(name="score", type=number)),
            _Column(
                column="signed_up_at", attribute=_Attribute(name="signed_up_at", type=timestamp)
            ),
        ],
    )


async def _requests(path: Path) -> AsyncIterator[import_pb2.ImportUsersRequest]:
    yield import_pb2.ImportUsersRequest(options=_options())
    with path.open("rb") as source:
        while chunk := source.read(CHUNK_BYTES):
            yield import_pb2.ImportUsersRequest(chunk=chunk)


@benchmark("identity.csv_import", needs=("ceiling.pg_copy_csv_rows_per_s",))
async def csv_import(ctx: Context) -> list[Figure]:
    """ImportUsers of the CSV file: seconds, rows/s against a raw COPY, peak RSS."""
    count = _rows(ctx)
    async with (
        _file(ctx) as path,
        _identity_on_scratch_db(ctx) as ([service], _dsn),
        grpc.aio.insecure_channel(service.grpc_target) as channel,
    ):
        _app_id, server_key = await _create_app(channel)
        stub: Any = identity_service_pb2_grpc.IdentityServiceStub(channel)
        metadata = (("authorization", f"Bearer {server_key}"),)
        reset_peak_rss(service.pid)
        start = time.perf_counter()
        job = await stub.ImportUsers(_requests(path), metadata=metadata)
        seconds = time.perf_counter() - start
        peak = peak_rss_mb(service.pid)
    if job.state != import_pb2.ImportJob.STATE_SUCCEEDED or job.created != count:
        raise AssertionError(
            f"import ended {job.state} with {job.created} created: {job.error}"
            f" {list(job.rejections)[:3]}"
        )
    ctx.log(f"  imported {count:,} rows in {seconds:.2f} s, peak RSS {peak:.0f} MiB")
    # At SIZE=tiny the "1m" figure is the tiny file's time: a smoke test, not a figure.
    copy_rate = ctx.value("ceiling.pg_copy_csv_rows_per_s")
    return [
        Figure("identity.csv_import_1m_s", seconds, "s", target=10.0),
        Figure(
            "identity.csv_import_rows_per_s",
            count / seconds,
            "rows/s",
            limit=copy_rate,
            target=0.3 * copy_rate,
        ),
        Figure("identity.csv_import_peak_rss_mb", peak, "MiB", target=300.0),
    ]
