"""The migration runner against a real, fresh PostgreSQL database per test."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from services.runtime.migrations import (
    RUNTIME_MIGRATIONS,
    MigrationError,
    MigrationSource,
    discover,
    migrate,
    sources_for,
)

RUNTIME_LABELS = [f"runtime/{m.version:04d}_{m.name}" for m in discover(RUNTIME_MIGRATIONS)]


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql, encoding="utf-8")
    return directory


async def fetch_all(dsn: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(query)
    finally:
        await conn.close()


async def tables(dsn: str) -> set[str]:
    rows = await fetch_all(
        dsn, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
    )
    return {row["tablename"] for row in rows}


async def recorded(dsn: str) -> list[tuple[str, int, str]]:
    rows = await fetch_all(
        dsn, "SELECT component, version, name FROM schema_migrations ORDER BY component, version"
    )
    return [(row["component"], row["version"], row["name"]) for row in rows]


SERVICE_FILES = {
    "0001_widgets.sql": "CREATE TABLE widgets (id bigint PRIMARY KEY, name text NOT NULL);",
    "0002_widget_color.sql": (
        "ALTER TABLE widgets ADD COLUMN color text;\n"
        "CREATE INDEX widgets_color_idx ON widgets (color);"
    ),
    "README.md": "not a migration; ignored",
}


async def test_fresh_apply_creates_tables_and_records_versions(
    scratch_db: str, tmp_path: Path
) -> None:
    directory = write(tmp_path / "svc", SERVICE_FILES)

    applied = await migrate(scratch_db, sources_for("svc", directory))

    assert applied == [*RUNTIME_LABELS, "svc/0001_widgets", "svc/0002_widget_color"]
    assert {"schema_migrations", "outbox", "outbox_instance", "inbox", "widgets"} <= await tables(
        scratch_db
    )
    assert await recorded(scratch_db) == [
        ("runtime", 1, "outbox_inbox"),
        ("svc", 1, "widgets"),
        ("svc", 2, "widget_color"),
    ]


async def test_second_apply_is_a_no_op(scratch_db: str, tmp_path: Path) -> None:
    sources = sources_for("svc", write(tmp_path / "svc", SERVICE_FILES))
    await migrate(scratch_db, sources)

    assert await migrate(scratch_db, sources) == []
    assert len(await recorded(scratch_db)) == 3


async def test_new_file_is_applied_on_its_own(scratch_db: str, tmp_path: Path) -> None:
    directory = write(tmp_path / "svc", SERVICE_FILES)
    await migrate(scratch_db, sources_for("svc", directory))
    write(directory, {"0003_gadgets.sql": "CREATE TABLE gadgets (id bigint PRIMARY KEY);"})

    assert await migrate(scratch_db, sources_for("svc", directory)) == ["svc/0003_gadgets"]


async def test_concurrent_runners_apply_each_file_once(scratch_db: str, tmp_path: Path) -> None:
    # Plain CREATE TABLE fails if run twice, and the sleep widens the window two unserialised
    # runners would need to collide in.
    directory = write(
        tmp_path / "svc",
        {
            "0001_slow.sql": "SELECT pg_sleep(0.2); CREATE TABLE slow (id int);",
            "0002_after.sql": "CREATE TABLE after_slow (id int);",
        },
    )
    sources = sources_for("svc", directory)

    results = await asyncio.gather(*(migrate(scratch_db, sources) for _ in range(6)))

    everything = [label for result in results for label in result]
    assert sorted(everything) == sorted([*RUNTIME_LABELS, "svc/0001_slow", "svc/0002_after"])
    # One runner did all the work; the others waited for the lock and found nothing to do.
    assert sorted(len(result) for result in results) == [0, 0, 0, 0, 0, len(everything)]
    assert len(await recorded(scratch_db)) == 3


async def test_changed_checksum_is_refused(scratch_db: str, tmp_path: Path) -> None:
    directory = write(tmp_path / "svc", SERVICE_FILES)
    await migrate(scratch_db, sources_for("svc", directory))
    write(
        directory,
        {
            "0002_widget_color.sql": "ALTER TABLE widgets ADD COLUMN colour text;",
            "0003_more.sql": "CREATE TABLE more (id int);",
        },
    )

    with pytest.raises(MigrationError, match=r"svc/0002_widget_color was changed"):
        await migrate(scratch_db, sources_for("svc", directory))
    # Nothing after the refused file ran.
    assert "more" not in await tables(scratch_db)


async def test_renamed_landed_migration_is_refused(scratch_db: str, tmp_path: Path) -> None:
    directory = write(tmp_path / "svc", SERVICE_FILES)
    await migrate(scratch_db, sources_for("svc", directory))
    (directory / "0001_widgets.sql").rename(directory / "0001_things.sql")

    with pytest.raises(MigrationError, match="was changed"):
        await migrate(scratch_db, sources_for("svc", directory))


async def test_windows_line_endings_do_not_count_as_a_change(
    scratch_db: str, tmp_path: Path
) -> None:
    directory = write(tmp_path / "svc", {"0001_a.sql": "CREATE TABLE a (id int);\nSELECT 1;\n"})
    await migrate(scratch_db, sources_for("svc", directory))
    (directory / "0001_a.sql").write_bytes(b"CREATE TABLE a (id int);\r\nSELECT 1;\r\n")

    assert await migrate(scratch_db, sources_for("svc", directory)) == []


async def test_failing_migration_rolls_back_only_itself(scratch_db: str, tmp_path: Path) -> None:
    directory = write(
        tmp_path / "svc",
        {
            "0001_a.sql": "CREATE TABLE a (id int);",
            "0002_b.sql": "CREATE TABLE b (id int);",
            # The first statement succeeds, the second fails: the whole file must roll back.
            "0003_broken.sql": "CREATE TABLE c (id int);\nINSERT INTO no_such_table VALUES (1);",
            "0004_d.sql": "CREATE TABLE d (id int);",
        },
    )

    with pytest.raises(MigrationError, match=r"svc/0003_broken failed.*no_such_table"):
        await migrate(scratch_db, sources_for("svc", directory))

    present = await tables(scratch_db)
    assert {"a", "b"} <= present
    assert not {"c", "d"} & present
    assert [row for row in await recorded(scratch_db) if row[0] == "svc"] == [
        ("svc", 1, "a"),
        ("svc", 2, "b"),
    ]

    # Fixing the (never applied) file lets the next run continue where it stopped.
    write(directory, {"0003_broken.sql": "CREATE TABLE c (id int);"})
    assert await migrate(scratch_db, sources_for("svc", directory)) == [
        "svc/0003_broken",
        "svc/0004_d",
    ]


async def test_versions_unknown_to_this_code_are_tolerated(scratch_db: str, tmp_path: Path) -> None:
    # A newer release already applied 0002; this (older) code only knows 0001.
    newer = write(tmp_path / "newer", SERVICE_FILES)
    await migrate(scratch_db, sources_for("svc", newer))
    older = write(tmp_path / "older", {"0001_widgets.sql": SERVICE_FILES["0001_widgets.sql"]})

    assert await migrate(scratch_db, sources_for("svc", older)) == []


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"0001_a.sql": "", "0003_c.sql": ""}, "missing 0002"),
        ({"0002_b.sql": ""}, "missing 0001"),
        ({"0001_a.sql": "", "0001_b.sql": ""}, "version 0001 is used twice"),
        ({"1_a.sql": ""}, "not named NNNN_lower_snake_name.sql"),
        ({"0001_Bad-Name.sql": ""}, "not named NNNN_lower_snake_name.sql"),
    ],
)
def test_malformed_sources_are_refused(tmp_path: Path, files: dict[str, str], message: str) -> None:
    source = MigrationSource("svc", write(tmp_path / "svc", files))

    with pytest.raises(MigrationError, match=message):
        discover(source)


async def test_malformed_source_fails_before_touching_the_database(
    scratch_db: str, tmp_path: Path
) -> None:
    directory = write(tmp_path / "svc", {"0002_b.sql": "CREATE TABLE b (id int);"})

    with pytest.raises(MigrationError, match="missing 0001"):
        await migrate(scratch_db, sources_for("svc", directory))
    assert "schema_migrations" not in await tables(scratch_db)


async def test_missing_directory_and_duplicate_components_are_refused(
    scratch_db: str, tmp_path: Path
) -> None:
    with pytest.raises(MigrationError, match="does not exist"):
        await migrate(scratch_db, sources_for("svc", tmp_path / "nope"))
    with pytest.raises(MigrationError, match="appears twice"):
        await migrate(scratch_db, [RUNTIME_MIGRATIONS, RUNTIME_MIGRATIONS])


async def test_comment_only_migration_is_recorded_without_running(
    scratch_db: str, tmp_path: Path
) -> None:
    service = write(
        tmp_path / "svc",
        {"0001_init.sql": "-- tables arrive later\n\n", "0002_t.sql": "CREATE TABLE t (id int);"},
    )
    applied = await migrate(scratch_db, sources_for("svc", service))
    assert applied[-2:] == ["svc/0001_init", "svc/0002_t"]
    assert ("svc", 1, "init") in await recorded(scratch_db)
    assert "t" in await tables(scratch_db)
