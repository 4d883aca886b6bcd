"""gRPC surface of CSV imports: ImportUsers, GetImportJob, ListImportJobs, rejections.

Translation only: ``ImportOptions`` to :class:`~services.identity.import_options.ImportSpec`,
the upload's messages to a stream of bytes, jobs and rejections back to protobuf. Server keys
only; everything is scoped by the caller's app (another app's import id is NOT_FOUND).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import grpc.aio
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from tidings.identity.v1 import import_pb2

from services.identity import imports
from services.identity.access import server_app
from services.identity.csv_cells import csv_text
from services.identity.import_options import (
    AttributeKind,
    ColumnSpec,
    Encoding,
    IdKind,
    ImportSpec,
    Mode,
)
from services.identity.imports_store import ImportJob
from services.identity.subscriptions_server import TYPE_TO_PROTO
from services.runtime.app import ServiceContext
from services.runtime.errors import FieldViolation, InvalidArgument

__all__ = ["ImportsRpcs", "job_to_proto", "spec_from_proto"]

_Context = grpc.aio.ServicerContext[Any, Any]
_Options = import_pb2.ImportOptions
_Job = import_pb2.ImportJob

_ID_KINDS = {
    _Options.IDENTIFIER_KIND_EXTERNAL_ID: IdKind.EXTERNAL_ID,
    _Options.IDENTIFIER_KIND_ALIAS: IdKind.ALIAS,
    _Options.IDENTIFIER_KIND_USER_ID: IdKind.USER_ID,
}
_MODES = {
    _Options.MODE_UNSPECIFIED: Mode.CREATE_OR_UPDATE,
    _Options.MODE_CREATE_OR_UPDATE: Mode.CREATE_OR_UPDATE,
    _Options.MODE_CREATE_ONLY: Mode.CREATE_ONLY,
    _Options.MODE_UPDATE_ONLY: Mode.UPDATE_ONLY,
}
_ENCODINGS = {
    _Options.ENCODING_UNSPECIFIED: Encoding.UTF8,
    _Options.ENCODING_UTF8: Encoding.UTF8,
    _Options.ENCODING_LATIN1: Encoding.LATIN1,
}
_KINDS = {
    import_pb2.ImportAttribute.TYPE_STRING: AttributeKind.STRING,
    import_pb2.ImportAttribute.TYPE_NUMBER: AttributeKind.NUMBER,
    import_pb2.ImportAttribute.TYPE_BOOL: AttributeKind.BOOL,
    import_pb2.ImportAttribute.TYPE_DATE: AttributeKind.DATE,
    import_pb2.ImportAttribute.TYPE_TIMESTAMP: AttributeKind.TIMESTAMP,
}
_SUBSCRIPTION_TYPES = {value: key for key, value in TYPE_TO_PROTO.items()}
_STATES = {
    "receiving": _Job.STATE_RECEIVING,
    "applying": _Job.STATE_APPLYING,
    "succeeded": _Job.STATE_SUCCEEDED,
    "failed": _Job.STATE_FAILED,
}
#: Bytes of CSV per ``CsvChunk``.
_CHUNK_BYTES = 64 * 1024


def _column(message: import_pb2.ImportColumn) -> ColumnSpec:
    target = message.WhichOneof("target")
    column, date_format = message.column, message.date_format
    if target == "standard_field":
        return ColumnSpec(
            column, target="standard", standard=message.standard_field, date_format=date_format
        )
    if target == "attribute":
        return ColumnSpec(
            column,
            target="attribute",
            attribute=message.attribute.name,
            kind=_KINDS.get(message.attribute.type),
            date_format=date_format,
        )
    if target == "subscription":
        return ColumnSpec(
            column,
            target="subscription",
            subscription=_SUBSCRIPTION_TYPES.get(message.subscription.type),
            date_format=date_format,
        )
    return ColumnSpec(column, date_format=date_format)


def spec_from_proto(options: _Options) -> ImportSpec:
    """The options of an ImportUsers call, as the domain takes them (checked there)."""
    return ImportSpec(
        import_id=options.import_id,
        identifier_column=options.identifier_column,
        id_kind=_ID_KINDS.get(options.identifier_kind),
        alias_label=options.alias_label,
        columns=tuple(_column(column) for column in options.columns),
        mode=_MODES.get(options.mode),
        empty_cells_clear=options.empty_cells_clear,
        delimiter=options.delimiter or ",",
        quote=options.quote or '"',
        encoding=_ENCODINGS.get(options.encoding),
        list_name=options.list_name,
        size_bytes=options.size_bytes,
        dry_run=options.dry_run,
    )


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def job_to_proto(job: ImportJob) -> _Job:
    """A stored job as the API's ``ImportJob``."""
    message = _Job(
        import_id=job.import_id,
        options=json_format.ParseDict(job.options, _Options(), ignore_unknown_fields=True),
        state=_STATES[job.state],
        bytes_received=job.bytes_received,
        rows=job.rows,
        created=job.created,
        updated=job.updated,
        unchanged=job.unchanged,
        rejected=job.rejected,
        flagged_cells=job.flagged_cells,
        error=job.error,
        segment_id=job.segment_id,
        create_time=_timestamp(job.create_time),
        rejections=[
            import_pb2.ImportRejection(
                line=r.line, column=r.column, reason=r.reason, message=r.message
            )
            for r in job.rejections
        ],
    )
    if job.finish_time is not None:
        message.finish_time.CopyFrom(_timestamp(job.finish_time))
    return message


def _first_must_be_options() -> InvalidArgument:
    return InvalidArgument(
        "the first message of ImportUsers carries the options, the next ones the file",
        reason="OPTIONS_REQUIRED",
        field_violations=[FieldViolation("options", "required in the first message", "REQUIRED")],
    )


async def _chunks(
    requests: AsyncIterator[import_pb2.ImportUsersRequest], context: _Context
) -> AsyncIterator[bytes]:
    async for request in requests:
        part = request.WhichOneof("part")
        if part == "chunk":
            yield request.chunk
        elif part == "options":
            raise InvalidArgument(
                "options may only be sent in the first message",
                reason="OPTIONS_SENT_TWICE",
                field_violations=[FieldViolation("options", "only in the first message")],
            )
    # A client that went away ends the stream too: that is not the end of the file.
    if context.cancelled():
        raise asyncio.CancelledError("the client cancelled the upload")


class ImportsRpcs:
    """Mixin of :class:`~services.identity.server.IdentityServicer` for imports."""

    _ctx: ServiceContext

    async def ImportUsers(
        self, request_iterator: AsyncIterator[import_pb2.ImportUsersRequest], context: _Context
    ) -> import_pb2.ImportJob:
        """Import users from a CSV upload (options first, then chunks); answers the finished
        job. Server keys only."""
        caller = server_app()
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or first.WhichOneof("part") != "options":
            raise _first_must_be_options()
        job = await imports.run_import(
            self._ctx,
            caller.app_id,
            spec_from_proto(first.options),
            json_format.MessageToDict(first.options),
            _chunks(requests, context),
        )
        return job_to_proto(job)

    async def GetImportJob(
        self, request: import_pb2.GetImportJobRequest, context: _Context
    ) -> import_pb2.ImportJob:
        """One import job with its first 1,000 rejected rows. Server keys only."""
        caller = server_app()
        return job_to_proto(await imports.get_job(self._ctx, caller.app_id, request.import_id))

    async def ListImportJobs(
        self, request: import_pb2.ListImportJobsRequest, context: _Context
    ) -> import_pb2.ListImportJobsResponse:
        """The app's import jobs, newest first, without their rejections. Server keys only."""
        caller = server_app()
        jobs, token = await imports.list_jobs(
            self._ctx, caller.app_id, size=request.page_size, token=request.page_token
        )
        return import_pb2.ListImportJobsResponse(
            import_jobs=[job_to_proto(job) for job in jobs], next_page_token=token
        )

    async def ExportImportRejections(
        self, request: import_pb2.ExportImportRejectionsRequest, context: _Context
    ) -> AsyncIterator[import_pb2.CsvChunk]:
        """Every rejected row as CSV (``line,column,reason,message``), formula-like cells
        quoted with ``'``. Server keys only."""
        caller = server_app()
        pending = csv_text([("line", "column", "reason", "message")])
        async for page in imports.rejection_pages(self._ctx, caller.app_id, request.import_id):
            pending += csv_text((r.line, r.column, r.reason, r.message) for r in page)
            while len(pending) >= _CHUNK_BYTES:
                yield import_pb2.CsvChunk(data=pending[:_CHUNK_BYTES].encode())
                pending = pending[_CHUNK_BYTES:]
        yield import_pb2.CsvChunk(data=pending.encode())
