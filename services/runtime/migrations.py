"""Numbered plain-SQL migrations, applied once per database, safely from several replicas at once.

A *source* is a component name and a directory of files named ``NNNN_name.sql`` (four digits,
starting at ``0001``, no gaps, lower-case snake name). Every service database first gets the
runtime's own migrations (outbox and inbox tables, :data:`RUNTIME_MIGRATIONS`), then the service's:

    applied = await migrate(settings.database_url, sources_for("identity", MIGRATIONS_DIR))

What :func:`migrate` guarantees:

* Each file runs in its own transaction together with its ``schema_migrations`` row, so a file
  is either fully applied and recorded, or not at all; files before a failing one stay applied.
* A session-level advisory lock (:data:`MIGRATION_LOCK_KEY`) serialises runners, so two replicas
  starting together apply each file exactly once; the second waits, then finds nothing to do.
* A file whose content changed after it was applied, or that was renamed, is refused
  (:class:`MigrationError`): never edit a landed migration, add a new one.
* Versions recorded in the database but unknown to this code (a newer release already migrated,
  e.g. during a rolling deploy) are tolerated and logged, like Flyway's ``ignore future``.

Sharp edges:
    * A file is sent as one simple-protocol ``execute``, so it may hold several statements but
      no parameters, and statements that refuse to run in a transaction block (``CREATE INDEX
      CONCURRENTLY``, ``ALTER TYPE ... ADD VALUE`` before PG 12) cannot be used.
    * Runners wait for the lock without a timeout; a migration stuck behind a long-running
      query's table lock keeps every other starting replica waiting too.
    * Checksums are taken over the file with ``\\r\\n`` normalised to ``\\n``, so a Windows
      checkout does not look like an edited migration.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from services.runtime.db import DataPlaneError

__all__ = [
    "MIGRATION_LOCK_KEY",
    "RUNTIME_MIGRATIONS",
    "Migration",
    "MigrationError",
    "MigrationSource",
    "discover",
    "migrate",
    "sources_for",
]

log = logging.getLogger(__name__)

#: Advisory lock key held while migrating ("tdngmigr" as a big-endian int64). Advisory locks are
#: per database, so one fixed key serialises runners of one database and no others.
MIGRATION_LOCK_KEY = int.from_bytes(b"tdngmigr", "big")

_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9][a-z0-9_]*)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component  text        NOT NULL,
    version    integer     NOT NULL,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)
"""


class MigrationError(DataPlaneError):
    """A migration set is malformed, conflicts with what the database recorded, or failed."""


@dataclass(frozen=True)
class MigrationSource:
    """A component's migrations: ``directory`` holds its ``NNNN_name.sql`` files.

    Attributes:
        component: Name recorded in ``schema_migrations.component`` (e.g. ``"identity"``); each
            component has its own version sequence.
        directory: Folder of the SQL files.
    """

    component: str
    directory: Path


@dataclass(frozen=True)
class Migration:
    """One SQL file of a source, read and checksummed."""

    component: str
    version: int
    name: str
    sql: str
    checksum: str

    @property
    def label(self) -> str:
        """``component/NNNN_name``, how migrations are named in logs and return values."""
        return f"{self.component}/{self.version:04d}_{self.name}"

    @property
    def has_statements(self) -> bool:
        """False for a file of only ``--`` comments, which the server would reject as empty."""
        return any(
            line.strip() and not line.strip().startswith("--") for line in self.sql.splitlines()
        )


#: The runtime's own tables (outbox, inbox), applied to every service database before its own.
RUNTIME_MIGRATIONS = MigrationSource("runtime", Path(__file__).resolve().parent / "migrations")


def sources_for(component: str, directory: Path) -> list[MigrationSource]:
    """The sources a service database needs: the runtime's, then the service's own."""
    return [RUNTIME_MIGRATIONS, MigrationSource(component, directory)]


def discover(source: MigrationSource) -> list[Migration]:
    """Read and validate a source's files, in version order.

    Files not ending in ``.sql`` are ignored (a README may sit next to them).

    Raises:
        MigrationError: The directory is missing, a ``.sql`` file is badly named, a version is
            used twice, or the versions are not exactly ``1..n``.
    """
    if not source.directory.is_dir():
        raise MigrationError(
            f"{source.component}: migrations directory {source.directory} does not exist"
        )
    by_version: dict[int, Migration] = {}
    for path in sorted(source.directory.iterdir()):
        if path.suffix != ".sql":
            continue
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(
                f"{source.component}: {path.name} is not named NNNN_lower_snake_name.sql"
            )
        version = int(match["version"])
        if version in by_version:
            other = by_version[version]
            raise MigrationError(
                f"{source.component}: version {version:04d} is used twice "
                f"({other.version:04d}_{other.name}.sql and {path.name})"
            )
        sql = path.read_text(encoding="utf-8").replace("\r\n", "\n")
        by_version[version] = Migration(
            component=source.component,
            version=version,
            name=match["name"],
            sql=sql,
            checksum=hashlib.sha256(sql.encode("utf-8")).hexdigest(),
        )
    versions = sorted(by_version)
    if versions != list(range(1, len(versions) + 1)):
        missing = sorted(set(range(1, (versions[-1] if versions else 0) + 1)) - set(versions))
        raise MigrationError(
            f"{source.component}: versions must run 0001..N without gaps; "
            f"missing {', '.join(f'{v:04d}' for v in missing)}"
        )
    return [by_version[v] for v in versions]


async def migrate(dsn: str, sources: Sequence[MigrationSource]) -> list[str]:
    """Apply the pending migrations of ``sources``, in order, to the database at ``dsn``.

    Safe to call from several processes at once (see the module docstring) and idempotent.

    Args:
        dsn: The database to migrate; the runner opens (and closes) its own connection.
        sources: Components in the order they must be applied, e.g. :func:`sources_for`.

    Returns:
        Labels (``component/NNNN_name``) of the migrations applied by this call, in order;
        ``[]`` when the database was already up to date.

    Raises:
        MigrationError: Invalid files, a changed or renamed landed migration, or a failing
            migration (its transaction is rolled back; the ones before it stay applied).
    """
    components = [source.component for source in sources]
    if len(set(components)) != len(components):
        raise MigrationError(f"a component appears twice in {components}")
    # Validate every file before touching the database, so a typo fails fast and changes nothing.
    plan = [(source, discover(source)) for source in sources]

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            await conn.execute(_CREATE_TABLE)
            applied: list[str] = []
            for source, migrations in plan:
                applied += await _apply_source(conn, source, migrations)
            return applied
        finally:
            # Best effort: closing the session releases the lock anyway, and an error here
            # must not hide the one that got us here.
            try:
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                log.warning("could not release the migration lock: %r", exc)
    finally:
        await conn.close()


async def _apply_source(
    conn: asyncpg.Connection, source: MigrationSource, migrations: list[Migration]
) -> list[str]:
    rows = await conn.fetch(
        "SELECT version, name, checksum FROM schema_migrations WHERE component = $1",
        source.component,
    )
    recorded = {row["version"]: row for row in rows}
    known = {m.version: m for m in migrations}

    for version, row in sorted(recorded.items()):
        local = known.get(version)
        if local is None:
            log.warning(
                "database has %s/%04d_%s, which this code does not know (a newer release?)",
                source.component,
                version,
                row["name"],
            )
            continue
        if row["name"] != local.name or row["checksum"] != local.checksum:
            raise MigrationError(
                f"{local.label} was changed after it was applied (recorded as "
                f"{version:04d}_{row['name']}, checksum {row['checksum'][:12]}..., file now "
                f"{local.checksum[:12]}...); never edit a landed migration, add a new one"
            )

    pending = [m for m in migrations if m.version not in recorded]
    if pending and recorded and pending[0].version < max(recorded):
        raise MigrationError(
            f"{pending[0].label} is pending but later versions are already applied "
            f"(up to {max(recorded):04d}); migrations must be applied in order"
        )

    applied: list[str] = []
    for migration in pending:
        try:
            async with conn.transaction():
                if migration.has_statements:
                    await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (component, version, name, checksum) "
                    "VALUES ($1, $2, $3, $4)",
                    migration.component,
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise MigrationError(f"{migration.label} failed and was rolled back: {exc}") from exc
        log.info("applied migration %s", migration.label)
        applied.append(migration.label)
    return applied
