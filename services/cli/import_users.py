"""``python -m services.cli.import_users FILE ...``: upload a CSV file of users to identity.

Streams the file to ``IdentityService/ImportUsers`` in chunks, shows a progress bar (bytes sent,
and rows read by the server, polled from GetImportJob), prints the outcome and, with
``--rejections``, writes the refused rows to a CSV file: line, column, reason and message, then
the row's own cells. Exit status: 0 when the import succeeded (some rows may have been refused:
see the counts), 1 when it failed (nothing was written), 2 for a bad command line or a refused
request.

Example::

    python -m services.cli.import_users customers.csv --key "$SERVER_KEY" \\
        --id-column customer_id --column email=email --column Phone=phone \\
        --attribute plan:string --attribute "Signed up=signed_up_at:timestamp" \\
        --date-format "Signed up=%d/%m/%Y %H:%M" --subscription email:email \\
        --list-name "Spring campaign" --rejections refused.csv
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc
import grpc.aio
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tidings.identity.v1 import identity_service_pb2_grpc, import_pb2
from tidings.identity.v1 import subscription_pb2 as spb

from services.identity.csv_cells import csv_text
from services.identity.import_csv import CsvStream, UnreadableFile

__all__ = ["build_options", "main", "parse_args"]

_Options = import_pb2.ImportOptions
_Attribute = import_pb2.ImportAttribute
_Job = import_pb2.ImportJob

DEFAULT_SERVER = "127.0.0.1:50051"
CHUNK_BYTES = 1 << 20
#: Seconds between progress polls and redraws.
POLL_SECONDS = 0.5

_ID_KINDS = {
    "external_id": _Options.IDENTIFIER_KIND_EXTERNAL_ID,
    "alias": _Options.IDENTIFIER_KIND_ALIAS,
    "user_id": _Options.IDENTIFIER_KIND_USER_ID,
}
_MODES = {
    "both": _Options.MODE_CREATE_OR_UPDATE,
    "create": _Options.MODE_CREATE_ONLY,
    "update": _Options.MODE_UPDATE_ONLY,
}
_ENCODINGS = {
    "utf-8": _Options.ENCODING_UTF8,
    "utf8": _Options.ENCODING_UTF8,
    "latin-1": _Options.ENCODING_LATIN1,
    "latin1": _Options.ENCODING_LATIN1,
}
_TYPES = {
    "string": _Attribute.TYPE_STRING,
    "number": _Attribute.TYPE_NUMBER,
    "bool": _Attribute.TYPE_BOOL,
    "date": _Attribute.TYPE_DATE,
    "timestamp": _Attribute.TYPE_TIMESTAMP,
}
_SUBSCRIPTIONS = {
    "email": spb.SUBSCRIPTION_TYPE_EMAIL,
    "sms": spb.SUBSCRIPTION_TYPE_SMS,
    "whatsapp": spb.SUBSCRIPTION_TYPE_WHATSAPP,
    "telegram": spb.SUBSCRIPTION_TYPE_TELEGRAM,
    "ios_push": spb.SUBSCRIPTION_TYPE_IOS_PUSH,
    "android_push": spb.SUBSCRIPTION_TYPE_ANDROID_PUSH,
}


class UsageError(Exception):
    """A command-line value that cannot be turned into options."""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line, parsed (``--help`` lists every option)."""
    parser = argparse.ArgumentParser(
        prog="python -m services.cli.import_users",
        description="Import users from a CSV file into Tidings identity.",
    )
    parser.add_argument("file", type=Path, help="the CSV file (its first line is the header)")
    parser.add_argument("--server", default=DEFAULT_SERVER, help="identity's host:port")
    parser.add_argument(
        "--key",
        default=os.environ.get("TIDINGS_API_KEY", ""),
        help="a server key (default: $TIDINGS_API_KEY)",
    )
    parser.add_argument("--id-column", required=True, help="header of the column naming users")
    parser.add_argument("--id-kind", choices=sorted(_ID_KINDS), default="external_id")
    parser.add_argument("--alias-label", default="", help="the label, for --id-kind alias")
    parser.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="HEADER=FIELD",
        help="a column holding a standard field (first_name, last_name, email, phone, "
        "birthdate, timezone, language, country)",
    )
    parser.add_argument(
        "--attribute",
        action="append",
        default=[],
        metavar="[HEADER=]NAME:TYPE",
        help=f"a column holding a custom attribute; TYPE is one of {', '.join(_TYPES)}",
    )
    parser.add_argument(
        "--subscription",
        action="append",
        default=[],
        metavar="HEADER:TYPE",
        help=f"a column holding subscriptions; TYPE is one of {', '.join(_SUBSCRIPTIONS)}",
    )
    parser.add_argument(
        "--date-format",
        action="append",
        default=[],
        metavar="HEADER=FORMAT",
        help="strftime format of a date column (birthdate, date and timestamp attributes)",
    )
    parser.add_argument("--mode", choices=sorted(_MODES), default="both")
    parser.add_argument("--clear-empty", action="store_true", help="empty cells clear fields")
    parser.add_argument("--delimiter", default=",")
    parser.add_argument("--quote", default='"')
    parser.add_argument("--encoding", choices=sorted(_ENCODINGS), default="utf-8")
    parser.add_argument("--list-name", default="", help="make a list segment of the import")
    parser.add_argument(
        "--dry-run", action="store_true", help="check and count only: nothing is written"
    )
    parser.add_argument("--import-id", default="", help="the job's id (default: generated)")
    parser.add_argument("--rejections", type=Path, help="write refused rows to this CSV file")
    parser.add_argument("--chunk-size", type=int, default=CHUNK_BYTES, help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def _split(text: str, separator: str, what: str) -> tuple[str, str]:
    left, found, right = text.rpartition(separator)
    if not found or not left or not right:
        raise UsageError(f"{what}: expected {separator!r} in {text!r}")
    return left, right


def build_options(args: argparse.Namespace, size: int) -> import_pb2.ImportOptions:
    """ImportOptions from the command line.

    Raises:
        UsageError: A malformed ``--column``, ``--attribute``, ``--subscription`` or
            ``--date-format`` value.
    """
    formats = dict(_split(item, "=", "--date-format") for item in args.date_format)
    columns: list[import_pb2.ImportColumn] = []
    for item in args.column:
        header, field = _split(item, "=", "--column")
        columns.append(import_pb2.ImportColumn(column=header, standard_field=field))
    for item in args.attribute:
        target, kind = _split(item, ":", "--attribute")
        header, _, name = target.partition("=")
        if kind not in _TYPES:
            raise UsageError(f"--attribute: unknown type {kind!r}; one of {', '.join(_TYPES)}")
        columns.append(
            import_pb2.ImportColumn(
                column=header, attribute=_Attribute(name=name or header, type=_TYPES[kind])
            )
        )
    for item in args.subscription:
        header, kind = _split(item, ":", "--subscription")
        if kind not in _SUBSCRIPTIONS:
            raise UsageError(
                f"--subscription: unknown type {kind!r}; one of {', '.join(_SUBSCRIPTIONS)}"
            )
        columns.append(
            import_pb2.ImportColumn(
                column=header,
                subscription=import_pb2.ImportSubscription(type=_SUBSCRIPTIONS[kind]),
            )
        )
    for column in columns:
        column.date_format = formats.pop(column.column, "")
    if formats:
        raise UsageError(f"--date-format names columns that are not mapped: {sorted(formats)}")
    return _Options(
        import_id=args.import_id or f"cli-{secrets.token_hex(8)}",
        identifier_column=args.id_column,
        identifier_kind=_ID_KINDS[args.id_kind],
        alias_label=args.alias_label,
        columns=columns,
        mode=_MODES[args.mode],
        empty_cells_clear=args.clear_empty,
        delimiter=args.delimiter,
        quote=args.quote,
        encoding=_ENCODINGS[args.encoding],
        list_name=args.list_name,
        size_bytes=size,
        dry_run=args.dry_run,
    )


@dataclass
class _Upload:
    sent: int = 0
    done_sending: bool = False


class _Progress:
    """A one-line progress bar on a terminal (nothing when not a terminal or disabled)."""

    def __init__(self, out: TextIO, total: int, enabled: bool) -> None:
        self._out, self._total = out, total
        self._enabled = enabled and out.isatty()
        self._drawn = False

    def draw(self, upload: _Upload, job: _Job | None) -> None:
        if not self._enabled:
            return
        share = upload.sent / self._total if self._total else 1.0
        bar = "#" * int(share * 30)
        rows = f"{job.rows:,} rows, {job.rejected:,} refused" if job is not None else "starting"
        stage = "merging..." if upload.done_sending else f"{share:4.0%}"
        line = (
            f"\r[{bar:<30}] {stage} {upload.sent / 1e6:,.1f}/{self._total / 1e6:,.1f} MB · {rows}"
        )
        self._out.write(line.ljust(100)[:100])
        self._out.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self._out.write("\n")
            self._out.flush()


async def _requests(
    options: import_pb2.ImportOptions, path: Path, chunk_size: int, upload: _Upload
) -> AsyncIterator[import_pb2.ImportUsersRequest]:
    yield import_pb2.ImportUsersRequest(options=options)
    with path.open("rb") as source:
        while chunk := source.read(chunk_size):
            yield import_pb2.ImportUsersRequest(chunk=chunk)
            upload.sent += len(chunk)
    upload.done_sending = True


def _describe(error: grpc.aio.AioRpcError) -> str:
    lines = [f"{error.code().name}: {error.details()}"]
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            lines += [f"  {v.field}: {v.description}" for v in bad.field_violations]
    return "\n".join(lines)


def _outcome(job: _Job) -> str:
    state = _Job.State.Name(job.state).removeprefix("STATE_")
    preview = " (dry run: nothing was written)" if job.options.dry_run else ""
    lines = [
        f"import {job.import_id}: {state}{preview}",
        f"  rows {job.rows:,}: created {job.created:,}, updated {job.updated:,}, "
        f"unchanged {job.unchanged:,}, rejected {job.rejected:,}",
    ]
    if job.flagged_cells:
        lines.append(
            f"  {job.flagged_cells:,} rows have cells starting with = + - @ (stored as given; "
            "quoted in CSV exports)"
        )
    if job.segment_id:
        lines.append(f"  list segment: {job.segment_id}")
    if job.error:
        lines.append(f"  error: {job.error}")
    for rejection in list(job.rejections)[:5]:
        column = f" [{rejection.column}]" if rejection.column else ""
        lines.append(f"  line {rejection.line}{column}: {rejection.reason}: {rejection.message}")
    if job.rejected > 5:
        lines.append(f"  ... {job.rejected - 5:,} more (--rejections FILE writes them all)")
    return "\n".join(lines)


async def _poll(
    stub: Any,
    metadata: tuple[tuple[str, str], ...],
    import_id: str,
    upload: _Upload,
    progress: _Progress,
) -> None:
    job: _Job | None = None
    while True:
        # Not recorded yet, or a hiccup: the upload's own answer decides.
        with contextlib.suppress(grpc.aio.AioRpcError):
            job = await stub.GetImportJob(
                import_pb2.GetImportJobRequest(import_id=import_id), metadata=metadata, timeout=5
            )
        progress.draw(upload, job)
        await asyncio.sleep(POLL_SECONDS)


async def _write_rejections(
    stub: Any,
    metadata: tuple[tuple[str, str], ...],
    job: _Job,
    args: argparse.Namespace,
    target: Path,
) -> int:
    """The export, each rejection followed by its row's cells from the local file."""
    refused: dict[int, list[str]] = {}
    export = b""
    async for chunk in stub.ExportImportRejections(
        import_pb2.ExportImportRejectionsRequest(import_id=job.import_id), metadata=metadata
    ):
        export += chunk.data
    for row in list(csv.reader(io.StringIO(export.decode("utf-8"), newline="")))[1:]:
        refused[int(row[0])] = row[:4]
    stream = CsvStream(
        encoding="latin-1" if args.encoding.startswith("latin") else "utf-8",
        delimiter=args.delimiter,
        quote=args.quote,
    )
    header: list[str] = []
    cells: dict[int, list[str]] = {}
    with args.file.open("rb") as source:
        while True:
            data = source.read(CHUNK_BYTES)
            records = stream.feed(data) if data else stream.finish()
            for record in records:
                if not header and record.line == 1:
                    header = record.cells
                elif record.line in refused:
                    cells[record.line] = record.cells
            if not data:
                break
    with target.open("w", encoding="utf-8", newline="") as out:
        # The export's cells are defused already; csv_text defuses the file's own cells too.
        out.write(csv_text([["line", "column", "reason", "message", *header]]))
        out.write(csv_text([*row, *cells.get(line, [])] for line, row in sorted(refused.items())))
    return len(refused)


async def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run the import the command line describes; returns the exit status."""
    if not args.key:
        print("error: a server key is needed: --key or $TIDINGS_API_KEY", file=err)
        return 2
    try:
        size = args.file.stat().st_size
        options = build_options(args, size)
    except (OSError, UsageError) as exc:
        print(f"error: {exc}", file=err)
        return 2
    metadata = (("authorization", f"Bearer {args.key}"),)
    upload = _Upload()
    progress = _Progress(err, size, not args.no_progress)
    async with grpc.aio.insecure_channel(args.server) as channel:
        stub: Any = identity_service_pb2_grpc.IdentityServiceStub(channel)
        poller = asyncio.create_task(_poll(stub, metadata, options.import_id, upload, progress))
        started = time.monotonic()
        try:
            job: _Job = await stub.ImportUsers(
                _requests(options, args.file, args.chunk_size, upload), metadata=metadata
            )
        except grpc.aio.AioRpcError as error:
            progress.close()
            print(f"error: {_describe(error)}", file=err)
            return 2
        finally:
            poller.cancel()
        progress.close()
        print(_outcome(job), file=out)
        print(f"  took {time.monotonic() - started:.1f} s", file=out)
        if args.rejections is not None and job.state == _Job.STATE_SUCCEEDED:
            try:
                written = await _write_rejections(stub, metadata, job, args, args.rejections)
            except (OSError, UnreadableFile, grpc.aio.AioRpcError) as exc:
                print(f"error: could not write {args.rejections}: {exc}", file=err)
                return 2
            print(f"  {written:,} refused rows written to {args.rejections}", file=out)
    return 0 if job.state == _Job.STATE_SUCCEEDED else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv`` (default: the process's) and run."""
    return asyncio.run(run(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
