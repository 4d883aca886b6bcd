"""CSV imports: stream a file in, check every row, merge the good ones in one transaction.

How an import runs (:func:`run_import`):

1. The options are checked (:mod:`~services.identity.import_options`); the job is recorded
   RECEIVING under the caller's ``import_id`` (ALREADY_EXISTS if the app used it before).
2. The file streams through :class:`~services.identity.import_csv.CsvStream` and
   :class:`~services.identity.import_rows.RowChecker`: good rows are copied, in batches, into a
   temporary staging table with ``COPY``; refused rows are stored with their line, column and
   reason. Nothing is held but the current chunk and batch, so a file of any size streams in
   bounded memory. Progress (bytes, rows, rejections) is written every half second.
3. APPLYING: one transaction of set-based statements (:func:`imports_store.merge`) decides,
   for all staged rows at once, which user each names, what changes, and why a row is refused
   (duplicate id, mode, customer-field type...), then writes users, aliases, subscriptions,
   rejections and change facts (through the outbox), and marks the job SUCCEEDED.

Interruptions: the import runs on a database connection of its own that holds an advisory
lock for the job. If the upload breaks off (client gone, bad file) the job is marked FAILED at
once. Once the file is in, the merge runs in a task the call's cancellation does not reach, so
a client gone while the job is APPLYING leaves it to finish. If the process stops or dies, its
connection closes, the merge's transaction (if any) rolls back, and the lock is released:
:func:`recover_orphaned_jobs` (at start-up and every :data:`ORPHAN_CHECK_SECONDS`, on any
replica) marks such jobs FAILED. Either way nothing is half-applied, and uploading the file
again gives the state a single upload would have.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg

from services.identity import apps_store, imports_store, segments_store, users_store
from services.identity.fields import CustomerField
from services.identity.import_csv import CsvStream, Record, UnreadableFile
from services.identity.import_options import (
    ImportSpec,
    check_options,
    date_attributes,
    new_import_id,
    with_defined_fields,
)
from services.identity.import_rows import Rejection, RowChecker, StagedRow, StagingLayout
from services.identity.imports_store import (
    ColumnVerdict,
    ImportJob,
    MergeConflict,
    MergeCounts,
    MergePlan,
    Staging,
)
from services.runtime.app import ServiceContext
from services.runtime.errors import (
    AlreadyExists,
    DomainError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from services.runtime.paging import bad_page_token, decode_page_token, encode_page_token, page_size
from services.runtime.streams import confirm_stream_end

__all__ = [
    "INTERRUPTED",
    "MAX_RUNNING_IMPORTS",
    "ORPHAN_CHECK_SECONDS",
    "REJECTIONS_SHOWN",
    "get_job",
    "list_jobs",
    "recover_orphaned_jobs",
    "rejection_pages",
    "run_import",
    "run_orphan_checks",
]

#: Imports one process runs at once (each holds a database connection of its own).
MAX_RUNNING_IMPORTS = 4
#: Rejected rows GetImportJob shows (ExportImportRejections has them all).
REJECTIONS_SHOWN = 1_000
#: Staged rows per ``COPY``.
BATCH_ROWS = 5_000
#: Seconds between progress updates of a receiving job.
PROGRESS_SECONDS = 0.5
#: Seconds between checks for jobs whose process is gone.
ORPHAN_CHECK_SECONDS = 10.0
#: Attempts at the merge when concurrent writers win races on its keys.
MERGE_ATTEMPTS = 3
#: The error of a job whose process stopped.
INTERRUPTED = (
    "the import was interrupted (the service stopped while it ran); nothing was written: "
    "upload the file again"
)
_DEFAULT_PAGE_SIZE = 100
_MAX_PAGE_SIZE = 1_000

_running = 0
#: Merges under way (referenced: one whose caller went away is awaited by nobody).
_merging: set[asyncio.Task[None]] = set()


@dataclass(slots=True)
class _Progress:
    rows: int = 0
    rejected: int = 0
    flagged: int = 0
    bytes: int = 0


def _lock_key() -> int:
    # Random and never reused: two jobs never share a lock, so a live job is never taken for
    # an orphan. Positive, to stay clear of the runtime's fixed keys by construction of chance.
    return secrets.randbits(62) + 1


class _DryRun(Exception):
    """Rolls back the list-name check."""


async def _check_list_name(conn: asyncpg.Connection, app_id: str, name: str, at: datetime) -> None:
    """Refuse a ``list_name`` that cannot become a list, before reading the file: the list is
    created (empty) in a transaction that is rolled back, so the segments' own rules decide.

    Raises:
        InvalidArgument: The name is not acceptable.
        AlreadyExists: ``SEGMENT_NAME_TAKEN``.
    """
    with contextlib.suppress(_DryRun):
        async with conn.transaction():
            await _create_list(conn, app_id, name, "dry-run", at, empty=True)
            raise _DryRun


async def _create_list(
    conn: asyncpg.Connection,
    app_id: str,
    name: str,
    import_id: str,
    at: datetime,
    *,
    empty: bool = False,
) -> str:
    table = "import_members"
    await imports_store.create_members_table(conn, table, empty=empty)
    segment_id = await segments_store.create_list_segment(
        conn, app_id, display_name=name, import_id=import_id, members_table=table, at=at
    )
    return str(segment_id)


async def run_import(
    ctx: ServiceContext,
    app_id: str,
    spec: ImportSpec,
    options_json: dict[str, Any],
    chunks: AsyncIterator[bytes],
) -> ImportJob:
    """Run one import from its options and the file's bytes.

    Once the whole file is in, the merge runs in a task of its own that the call's
    cancellation does not reach: a client that goes away while the job is APPLYING does not
    throw the received file away (GetImportJob shows how it ended).

    Args:
        ctx: The service (settings for the import's own connection, the pool, the clock).
        app_id: The caller's app.
        spec: The options as sent.
        options_json: The same options as their protobuf JSON mapping (stored with the job).
        chunks: The file, in pieces of any size.

    Returns:
        The finished job: SUCCEEDED, or FAILED (``error`` says why) having written nothing.

    Raises:
        InvalidArgument: Bad options, or a header without the columns they name (the job, if
            recorded, is FAILED).
        AlreadyExists: The app has a job with this ``import_id``, or a segment named
            ``list_name``.
        ResourceExhausted: Too many imports are running in this process.
    """
    global _running
    spec = check_options(spec)
    if not spec.import_id:
        spec = replace(spec, import_id=new_import_id())
    options_json = {**options_json, "importId": spec.import_id}
    if _running >= MAX_RUNNING_IMPORTS:
        raise ResourceExhausted(
            f"{MAX_RUNNING_IMPORTS} imports are running on this server; retry in a while",
            reason="TOO_MANY_IMPORTS",
        )
    _running += 1
    merging: asyncio.Task[None] | None = None
    try:
        conn = await imports_store.connect(ctx.settings.database_url)
        try:
            received = await _run(ctx, conn, app_id, spec, options_json, chunks)
            if received is not None:
                # From here the merge owns the connection and the slot.
                merging = asyncio.create_task(_apply(ctx, conn, app_id, spec, received))
        finally:
            if merging is None:
                await _close(conn)
    finally:
        if merging is None:
            _running -= 1
    if merging is not None:
        _merging.add(merging)  # a task nobody awaits must be referenced to run to its end
        merging.add_done_callback(_merging.discard)
        await asyncio.shield(merging)
    return await get_job(ctx, app_id, spec.import_id)


async def _close(conn: asyncpg.Connection) -> None:
    # Closing the session releases the job's lock and drops its temporary tables.
    try:
        await asyncio.wait_for(conn.close(), 5.0)
    except BaseException:
        conn.terminate()
        raise


async def _run(
    ctx: ServiceContext,
    conn: asyncpg.Connection,
    app_id: str,
    spec: ImportSpec,
    options_json: dict[str, Any],
    chunks: AsyncIterator[bytes],
) -> _Received | None:
    """Record the job and receive the file; None when the job FAILED meanwhile."""
    import_id = spec.import_id
    lock_key = _lock_key()
    # The lock first: from the moment the job exists, its lock shows it is alive.
    await imports_store.try_lock(conn, lock_key)
    if spec.list_name:
        await _check_list_name(conn, app_id, spec.list_name, ctx.clock())
    if not await imports_store.create_job(
        conn, app_id, import_id, options_json, lock_key, ctx.clock()
    ):
        raise AlreadyExists(
            f"the app has an import {import_id!r} already; choose another id",
            reason="IMPORT_EXISTS",
            field_violations=[FieldViolation("options.import_id", "used by an earlier import")],
        )
    try:
        return await _receive(ctx, conn, app_id, spec, chunks)
    except UnreadableFile as exc:
        await _fail(ctx, app_id, import_id, str(exc))
    except _Failed as failed:
        await _fail(ctx, app_id, import_id, failed.error)
    except DomainError as exc:
        await _fail(ctx, app_id, import_id, exc.message)
        raise
    except BaseException:
        # The client went away, the process is stopping, or a bug: nothing was merged.
        with contextlib.suppress(Exception):
            await asyncio.shield(
                _fail(ctx, app_id, import_id, "the upload broke off; upload the file again")
            )
        raise
    return None


async def _apply(
    ctx: ServiceContext,
    conn: asyncpg.Connection,
    app_id: str,
    spec: ImportSpec,
    received: _Received,
) -> None:
    """The merge of a received file, then the connection closed and the slot freed."""
    global _running
    import_id = spec.import_id
    try:
        await _merge(ctx, conn, app_id, spec, received)
    except _Failed as failed:
        await _fail(ctx, app_id, import_id, failed.error)
    except DomainError as exc:
        await _fail(ctx, app_id, import_id, exc.message)
        raise
    except asyncio.CancelledError:
        # Only the process stopping cancels a merge. If the pool is gone already, the orphan
        # check of the next process records the same.
        with contextlib.suppress(Exception):
            await asyncio.shield(_fail(ctx, app_id, import_id, INTERRUPTED))
        raise
    except Exception:
        with contextlib.suppress(Exception):
            await asyncio.shield(
                _fail(
                    ctx,
                    app_id,
                    import_id,
                    "the merge failed (an internal error); nothing was written: "
                    "upload the file again",
                )
            )
        raise
    finally:
        try:
            await _close(conn)
        finally:
            _running -= 1


class _Failed(Exception):
    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


async def _fail(ctx: ServiceContext, app_id: str, import_id: str, error: str) -> None:
    async with ctx.pool.acquire() as pool_conn:
        await imports_store.fail_job(pool_conn, app_id, import_id, error, ctx.clock())


@dataclass(frozen=True, slots=True)
class _Received:
    """A file received into the session's staging table."""

    staging: Staging
    sealed: frozenset[str]
    progress: _Progress
    seconds: float


async def _receive(
    ctx: ServiceContext,
    conn: asyncpg.Connection,
    app_id: str,
    spec: ImportSpec,
    chunks: AsyncIterator[bytes],
) -> _Received:
    dated = date_attributes(spec)
    if dated:
        # DATE columns into fields defined as timestamps keep filling them at midnight UTC.
        defined = await users_store.customer_fields(conn, app_id, dated)
        spec = with_defined_fields(spec, {name: f.type for name, f in defined.items()})
    layout = StagingLayout.of(spec)
    assert spec.id_kind is not None  # checked
    sealed = await _pii_columns(conn, app_id, layout)
    staging = Staging.new(
        layout,
        spec.id_kind,
        users_store.new_user_ids(1)[0].hex[:24],
        app_id=app_id,
        alias_label=spec.alias_label,
        sealed=sealed,
    )
    progress = _Progress()
    receiver = _Receiver(ctx, conn, app_id, spec, staging, progress)
    started = time.monotonic()
    await receiver.receive(chunks)
    await confirm_stream_end()  # a client gone mid-file must not look like a whole file
    return _Received(staging, sealed, progress, time.monotonic() - started)


async def _merge(
    ctx: ServiceContext,
    conn: asyncpg.Connection,
    app_id: str,
    spec: ImportSpec,
    received: _Received,
) -> MergeCounts:
    staging, sealed, progress = received.staging, received.sealed, received.progress
    layout = staging.layout
    started = time.monotonic()
    async with ctx.pool.acquire() as pool_conn:
        await imports_store.set_applying(pool_conn, app_id, spec.import_id)
    await conn.execute(f"ANALYZE {imports_store.STAGING}")
    at = ctx.clock()
    for _ in range(MERGE_ATTEMPTS):
        try:
            async with conn.transaction():
                plan = MergePlan(
                    app_id=app_id,
                    import_id=spec.import_id,
                    staging=staging,
                    alias_label=spec.alias_label,
                    mode=spec.mode,  # type: ignore[arg-type]  # checked
                    clear=spec.empty_cells_clear,
                    verdicts=await _attribute_verdicts(
                        conn, app_id, layout, at, dry_run=spec.dry_run
                    ),
                    at=at,
                )
                if await _pii_columns(conn, app_id, layout) != sealed:
                    raise _Failed(
                        "a customer field of the file was marked or unmarked as PII during the "
                        "import; nothing was written: upload the file again"
                    )
                await imports_store.lock_existing_users(conn, plan)
                counts = await imports_store.merge(conn, plan, dry_run=spec.dry_run)
                segment_id = ""
                if spec.list_name and not spec.dry_run:
                    segment_id = await _create_list(
                        conn, app_id, spec.list_name, spec.import_id, at
                    )
                total = replace(counts, rejected=counts.rejected + progress.rejected)
                await imports_store.finish_job(
                    conn,
                    app_id,
                    spec.import_id,
                    counts=total,
                    bytes_received=progress.bytes,
                    rows=progress.rows,
                    flagged_cells=progress.flagged,
                    segment_id=segment_id,
                    at=ctx.clock(),
                )
            await imports_store.drop_staging(conn)
            ctx.log.info(
                "import %s: %d rows received in %.2f s, merged in %.2f s",
                spec.import_id,
                progress.rows,
                received.seconds,
                time.monotonic() - started,
                extra={"import_id": spec.import_id, "app_id": app_id, "rows": progress.rows},
            )
            return total
        except (MergeConflict, asyncpg.DeadlockDetectedError, asyncpg.UniqueViolationError):
            continue
    raise _Failed(
        "concurrent writes to the same users kept conflicting with the import; nothing was "
        "written: upload the file again"
    )


async def _pii_columns(
    conn: asyncpg.Connection, app_id: str, layout: StagingLayout
) -> frozenset[str]:
    """Staging names of the attribute columns whose customer field is PII (sealed on the way
    in: the staging table and the merge only ever see ciphertext)."""
    names = {c.attribute for c in layout.attributes if c.attribute}
    if not names:
        return frozenset()
    defined = await users_store.customer_fields(conn, app_id, names)
    return frozenset(
        c.name
        for c in layout.attributes
        if (field := defined.get(c.attribute or "")) is not None and field.pii
    )


async def _attribute_verdicts(
    conn: asyncpg.Connection,
    app_id: str,
    layout: StagingLayout,
    at: datetime,
    *,
    dry_run: bool = False,
) -> dict[str, ColumnVerdict]:
    """Attribute columns whose values are refused, by staging column name.

    An undefined attribute is defined from its column's type when the app auto-defines (and
    the column holds a value), as a first write through the API would; otherwise its values
    are refused (UNDEFINED_FIELD). A defined one of another type: FIELD_TYPE_MISMATCH. A dry
    run only supposes the definitions (a field's type never changes once defined, so a
    preview must not define one).
    """
    columns = layout.attributes
    if not columns:
        return {}
    names = {c.attribute for c in columns if c.attribute}
    defined = await users_store.customer_fields(conn, app_id, names)
    undefined = [c for c in columns if c.attribute not in defined]
    if undefined:
        settings = await apps_store.get_app_settings(conn, app_id)
        if settings.undefined_fields != "reject":
            used = await imports_store.attribute_columns_used(conn, layout)
            auto = [
                CustomerField(c.attribute or "", imports_store.field_type_of(c), auto_defined=True)
                for c in undefined
                if c.name in used
            ]
            if dry_run:
                defined.update((field.name, field) for field in auto)
            else:
                await imports_store.insert_auto_fields(conn, app_id, auto, at)
                defined = await users_store.customer_fields(conn, app_id, names)
    verdicts: dict[str, ColumnVerdict] = {}
    for column in columns:
        field = defined.get(column.attribute or "")
        wanted = imports_store.field_type_of(column)
        if field is None:
            verdicts[column.name] = ColumnVerdict(
                "UNDEFINED_FIELD",
                f"{column.attribute!r} is not a defined customer field "
                "(the app refuses undefined fields)",
            )
        elif field.type is not wanted:
            verdicts[column.name] = ColumnVerdict(
                "FIELD_TYPE_MISMATCH",
                f"{column.attribute!r} is a {field.type.value} field; the column holds "
                f"{wanted.value} values",
            )
    return verdicts


class _Receiver:
    """Reads the upload into the staging table, recording rejections and progress."""

    def __init__(
        self,
        ctx: ServiceContext,
        conn: asyncpg.Connection,
        app_id: str,
        spec: ImportSpec,
        staging: Staging,
        progress: _Progress,
    ) -> None:
        assert spec.encoding is not None
        self._ctx = ctx
        self._conn = conn
        self._app_id = app_id
        self._spec = spec
        self._staging = staging
        self._progress = progress
        self._stream = CsvStream(
            encoding=spec.encoding.value, delimiter=spec.delimiter, quote=spec.quote
        )
        self._checker: RowChecker | None = None
        # Rejections quote the bad cell; not those of PII columns (they are stored in clear).
        self._pii_headers = frozenset(
            c.header for c in staging.layout.attributes if c.name in staging.sealed
        )
        self._staged: list[StagedRow] = []
        self._refused: list[Rejection] = []
        self._copying: asyncio.Task[None] | None = None

    async def receive(self, chunks: AsyncIterator[bytes]) -> None:
        await imports_store.create_staging(self._conn, self._staging)
        reporter = asyncio.create_task(self._report_every(PROGRESS_SECONDS))
        try:
            await self._receive(chunks)
        finally:
            reporter.cancel()
            copying, self._copying = self._copying, None
            if copying is not None and not copying.done():
                copying.cancel()  # the import failed: its connection is closed next anyway
            for task in (reporter, copying):
                if task is not None:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
        await self._report()

    async def _receive(self, chunks: AsyncIterator[bytes]) -> None:
        async for chunk in chunks:
            self._take(self._stream.feed(chunk))
            self._progress.bytes = self._stream.bytes_read
            if len(self._staged) >= BATCH_ROWS or len(self._refused) >= BATCH_ROWS:
                await self._flush()
        size, received = self._spec.size_bytes, self._stream.bytes_read
        if size and received != size:
            raise _Failed(
                f"the upload ended after {received:,} of the {size:,} bytes announced "
                "(options.size_bytes); nothing was written: upload the file again"
            )
        self._take(self._stream.finish())
        if self._checker is None:
            raise InvalidArgument(
                "the file is empty: its first line must be the header",
                reason="EMPTY_FILE",
            )
        await self._flush()
        await self._wait_copy()

    def _take(self, records: Iterable[Record]) -> None:
        batch = list(records)
        if self._checker is None and batch:
            self._checker = self._header(batch[0])
            del batch[0]
        if not batch:
            return
        assert self._checker is not None
        staged, refused, flagged = self._checker.check_all(batch)
        self._staged += staged
        if self._pii_headers:
            refused = [
                replace(r, message="the value is not valid for this field (a PII field: not shown)")
                if r.column in self._pii_headers
                else r
                for r in refused
            ]
        self._refused += refused
        self._progress.rows += len(batch)
        self._progress.rejected += len(refused)
        self._progress.flagged += flagged

    def _header(self, record: Record) -> RowChecker:
        if record.error or record.bad_encoding:
            raise InvalidArgument(
                f"the header (line {record.line}) cannot be read: "
                f"{record.error or 'it is not valid in the file encoding'}",
                reason="INVALID_HEADER",
            )
        return RowChecker(self._spec, record.cells, self._ctx.clock().astimezone(UTC).date())

    async def _wait_copy(self) -> None:
        if self._copying is not None:
            copying, self._copying = self._copying, None
            await copying

    async def _flush(self) -> None:
        await self._wait_copy()
        if not (self._staged or self._refused):
            return
        staged, self._staged = self._staged, []
        refused, self._refused = self._refused, []
        # The COPY runs while the next chunk is read and checked.
        self._copying = asyncio.create_task(self._copy(staged, refused))

    async def _copy(self, staged: list[StagedRow], refused: list[Rejection]) -> None:
        await imports_store.copy_staging(self._conn, self._staging, staged)
        await imports_store.copy_rejections(self._conn, self._app_id, self._spec.import_id, refused)

    async def _report_every(self, seconds: float) -> None:
        # Also while the client is slow to send: progress shows what arrived so far.
        reported = None
        while True:
            await asyncio.sleep(seconds)
            now = (self._progress.bytes, self._progress.rows, self._progress.rejected)
            if now != reported:
                await self._report()
                reported = now

    async def _report(self) -> None:
        async with self._ctx.pool.acquire() as conn:
            await imports_store.record_progress(
                conn,
                self._app_id,
                self._spec.import_id,
                bytes_received=self._progress.bytes,
                rows=self._progress.rows,
                rejected=self._progress.rejected,
                flagged_cells=self._progress.flagged,
            )


# -- reading jobs --------------------------------------------------------------------------------


async def get_job(ctx: ServiceContext, app_id: str, import_id: str) -> ImportJob:
    """One job of the app, with its first :data:`REJECTIONS_SHOWN` rejected rows.

    Raises:
        InvalidArgument: ``import_id`` empty.
        NotFound: ``IMPORT_NOT_FOUND`` (also for another app's job).
    """
    _require_id(import_id)
    async with ctx.pool.acquire() as conn:
        job = await imports_store.get_job(conn, app_id, import_id, with_rejections=REJECTIONS_SHOWN)
    if job is None:
        raise _not_found(import_id)
    return job


def _require_id(import_id: str) -> None:
    if not import_id:
        raise InvalidArgument(
            "import_id is required",
            reason="INVALID_FIELDS",
            field_violations=[FieldViolation("import_id", "required", "REQUIRED")],
        )


def _not_found(import_id: str) -> NotFound:
    return NotFound(
        f"import {import_id!r} not found",
        reason="IMPORT_NOT_FOUND",
        metadata={"import_id": import_id},
    )


async def list_jobs(
    ctx: ServiceContext, app_id: str, *, size: int, token: str
) -> tuple[list[ImportJob], str]:
    """A page of the app's jobs, newest first, and the next page's token.

    Raises:
        InvalidArgument: ``page_size`` negative or ``page_token`` not ours.
    """
    limit = page_size(size, default=_DEFAULT_PAGE_SIZE, maximum=_MAX_PAGE_SIZE)
    after = None
    if token:
        position = decode_page_token("import_jobs", token)
        try:
            after = (datetime.fromisoformat(position["t"]), position["i"])
        except (KeyError, ValueError):
            raise bad_page_token() from None
    async with ctx.pool.acquire() as conn:
        jobs = await imports_store.list_jobs(conn, app_id, after=after, limit=limit + 1)
    next_token = ""
    if len(jobs) > limit:
        last = jobs[limit - 1]
        next_token = encode_page_token(
            "import_jobs", {"t": last.create_time.isoformat(), "i": last.import_id}
        )
    return jobs[:limit], next_token


async def rejection_pages(
    ctx: ServiceContext, app_id: str, import_id: str, *, page_rows: int = 10_000
) -> AsyncIterator[list[Rejection]]:
    """Every rejected row of a job, in line order, a page at a time.

    Raises:
        InvalidArgument: ``import_id`` empty.
        NotFound: ``IMPORT_NOT_FOUND``.
    """
    _require_id(import_id)
    async with ctx.pool.acquire() as conn:
        if await imports_store.get_job(conn, app_id, import_id) is None:
            raise _not_found(import_id)
    after = 0
    while True:
        async with ctx.pool.acquire() as conn:
            page = await imports_store.rejections(
                conn, app_id, import_id, after_line=after, limit=page_rows
            )
        if page:
            yield page
        if len(page) < page_rows:
            return
        after = page[-1].line


# -- orphans -------------------------------------------------------------------------------------


async def recover_orphaned_jobs(ctx: ServiceContext) -> int:
    """Mark FAILED every running job whose process is gone (its lock is free).

    Returns:
        How many jobs were marked.
    """
    failed = 0
    async with ctx.pool.acquire() as conn:
        for app_id, import_id, lock_key in await imports_store.running_jobs(conn):
            if await imports_store.fail_orphaned(
                conn, app_id, import_id, lock_key, INTERRUPTED, ctx.clock()
            ):
                failed += 1
                ctx.log.warning(
                    "import %s of app %s was interrupted; marked failed",
                    import_id,
                    app_id,
                    extra={"import_id": import_id, "app_id": app_id},
                )
    return failed


async def run_orphan_checks(
    ctx: ServiceContext,
    *,
    every: float = ORPHAN_CHECK_SECONDS,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Background task: :func:`recover_orphaned_jobs` at start-up, then every ``every`` s."""
    while True:
        await recover_orphaned_jobs(ctx)
        await sleep(every)
