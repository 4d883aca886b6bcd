"""Templates: CRUD with versions, validation, and the locale variant a user gets.

A template is stored once per version (the whole ``Template`` message, serialised); the
``templates`` row holds what lists and uniqueness need and the latest version number. Updating
makes version N+1 and keeps the old ones: a send that pinned a version, or a message rendered
later, uses the version it names.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from tidings.delivery.v1 import template_pb2

from services.delivery import channels
from services.delivery.app_settings import ensure_app
from services.delivery.validation import (
    MAX_NAME_LENGTH,
    check_content,
    check_locale,
    normalize_locale,
    require_uuid,
)
from services.runtime import paging
from services.runtime.db import DBConnection
from services.runtime.errors import AlreadyExists, FieldViolations, NotFound

__all__ = [
    "TemplatePage",
    "choose_content",
    "create_template",
    "delete_template",
    "get_template",
    "list_template_versions",
    "list_templates",
    "load_templates",
    "template_not_found",
    "update_template",
]

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
_UPDATABLE = frozenset({"display_name", "description", "content", "locales"})


@dataclass(frozen=True, slots=True)
class TemplatePage:
    """One page of templates."""

    templates: list[template_pb2.Template]
    next_page_token: str


def template_not_found(template_id: str) -> NotFound:
    """The error for a template the app does not have."""
    return NotFound(
        f"template {template_id!r} not found",
        reason="TEMPLATE_NOT_FOUND",
        metadata={"template_id": template_id},
    )


def _validate(template: template_pb2.Template, field: str, *, creating: bool) -> None:
    violations = FieldViolations()
    name = template.display_name.strip()
    if not name:
        violations.add(f"{field}.display_name", "required", reason="REQUIRED")
    elif len(name) > MAX_NAME_LENGTH:
        violations.add(f"{field}.display_name", f"at most {MAX_NAME_LENGTH} characters")
    if len(template.description) > 2_000:
        violations.add(f"{field}.description", "at most 2,000 characters")
    channel = channels.channel_name(template.channel)
    if channel is None:
        violations.add(
            f"{field}.channel",
            "required: the channel the template is for" if creating else "unknown channel",
            reason="REQUIRED",
        )
    else:
        check_content(violations, f"{field}.content", template.content, channel)
        for locale, content in template.locales.items():
            check_locale(violations, f"{field}.locales[{locale!r}]", locale)
            check_content(violations, f"{field}.locales[{locale!r}]", content, channel)
    violations.raise_if_any()


def _normalized(template: template_pb2.Template) -> template_pb2.Template:
    out = template_pb2.Template()
    out.CopyFrom(template)
    out.display_name = template.display_name.strip()
    out.ClearField("locales")
    for locale, content in template.locales.items():
        out.locales[normalize_locale(locale) or locale].CopyFrom(content)
    return out


def _from_row(row: asyncpg.Record) -> template_pb2.Template:
    template = template_pb2.Template.FromString(row["body"])
    template.template_id = str(row["template_id"])
    template.version = row["version"]
    template.create_time.FromDatetime(row["create_time"])
    template.update_time.FromDatetime(row["version_time"])
    return template


_SELECT = """
SELECT t.template_id, v.version, v.body, t.create_time, v.create_time AS version_time,
       t.latest_version
FROM templates t
JOIN template_versions v USING (app_id, template_id)
"""


async def create_template(
    pool: asyncpg.Pool, app_id: str, template: template_pb2.Template, now: datetime
) -> template_pb2.Template:
    """Create a template at version 1.

    Raises:
        InvalidArgument: Naming each bad field (content kind, Liquid syntax, locales...).
        AlreadyExists: Another template of the app has the same display name.
    """
    _validate(template, "template", creating=True)
    stored = _normalized(template)
    template_id = uuid.uuid4()
    body = _body(stored)
    async with pool.acquire() as conn, conn.transaction():
        await ensure_app(conn, app_id)
        try:
            await conn.execute(
                """
                INSERT INTO templates (app_id, template_id, display_name, channel, latest_version,
                                       create_time, update_time)
                VALUES ($1, $2, $3, $4, 1, $5, $5)
                """,
                app_id,
                template_id,
                stored.display_name,
                channels.channel_name(stored.channel),
                now,
            )
        except asyncpg.UniqueViolationError:
            raise _name_taken(stored.display_name) from None
        await conn.execute(
            "INSERT INTO template_versions VALUES ($1, $2, 1, $3, $4)",
            app_id,
            template_id,
            body,
            now,
        )
    return await get_template(pool, app_id, str(template_id))


def _body(template: template_pb2.Template) -> bytes:
    # Output-only fields live in columns, not in the stored body.
    body = template_pb2.Template()
    body.CopyFrom(template)
    for name in ("template_id", "version", "create_time", "update_time"):
        body.ClearField(name)
    return body.SerializeToString(deterministic=True)


def _name_taken(name: str) -> AlreadyExists:
    return AlreadyExists(
        f"a template named {name!r} exists",
        reason="TEMPLATE_NAME_TAKEN",
        metadata={"display_name": name},
    )


async def get_template(
    conn: DBConnection | asyncpg.Pool, app_id: str, template_id: str, version: int = 0
) -> template_pb2.Template:
    """One template: the latest version, or ``version``.

    Raises:
        InvalidArgument: ``template_id`` is not a UUID, or ``version`` is negative.
        NotFound: The app has no such template (or version).
    """
    parsed = require_uuid("template_id", template_id, "template id")
    if version < 0:
        violations = FieldViolations()
        violations.add("version", "must not be negative")
        violations.raise_if_any()
    row = await conn.fetchrow(
        _SELECT
        + """
        WHERE t.app_id = $1 AND t.template_id = $2
          AND v.version = CASE WHEN $3 = 0 THEN t.latest_version ELSE $3 END
        """,
        app_id,
        parsed,
        version,
    )
    if row is None:
        raise template_not_found(template_id)
    return _from_row(row)


async def list_templates(
    pool: asyncpg.Pool, app_id: str, *, page_size: int, page_token: str, channel: int
) -> TemplatePage:
    """The app's templates (latest versions) by display name."""
    limit = paging.page_size(page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
    channel_name = channels.channel_name(channel) if channel else ""
    list_name = f"templates:{channel_name}"
    after = ""
    if page_token:
        after = paging.decode_page_token(list_name, page_token).get("n", "")
        if not after:
            raise paging.bad_page_token()
    rows = await pool.fetch(
        _SELECT
        + """
        WHERE t.app_id = $1 AND v.version = t.latest_version
          AND ($2 = '' OR t.channel = $2) AND t.display_name > $3
        ORDER BY t.display_name
        LIMIT $4
        """,
        app_id,
        channel_name or "",
        after,
        limit + 1,
    )
    templates = [_from_row(row) for row in rows[:limit]]
    token = ""
    if len(rows) > limit:
        token = paging.encode_page_token(list_name, {"n": templates[-1].display_name})
    return TemplatePage(templates, token)


async def list_template_versions(
    pool: asyncpg.Pool, app_id: str, template_id: str, *, page_size: int, page_token: str
) -> TemplatePage:
    """Every version of a template, newest first.

    Raises:
        NotFound: The app has no such template.
    """
    parsed = require_uuid("template_id", template_id, "template id")
    limit = paging.page_size(page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
    list_name = f"template_versions:{parsed}"
    before = 2**31 - 1
    if page_token:
        position = paging.decode_page_token(list_name, page_token).get("v", "")
        if not position.isdigit():
            raise paging.bad_page_token()
        before = int(position)
    rows = await pool.fetch(
        _SELECT
        + """
        WHERE t.app_id = $1 AND t.template_id = $2 AND v.version < $3
        ORDER BY v.version DESC
        LIMIT $4
        """,
        app_id,
        parsed,
        before,
        limit + 1,
    )
    if not rows and not page_token:
        raise template_not_found(template_id)
    templates = [_from_row(row) for row in rows[:limit]]
    token = ""
    if len(rows) > limit:
        token = paging.encode_page_token(list_name, {"v": str(templates[-1].version)})
    return TemplatePage(templates, token)


def _normalize_mask(paths: Iterable[str]) -> set[str]:
    violations = FieldViolations()
    chosen: set[str] = set()
    for path in paths:
        top = path.split(".", 1)[0]
        if top not in _UPDATABLE or (top != "locales" and "." in path):
            violations.add("update_mask", f"{path!r} cannot be updated")
        chosen.add(path)
    violations.raise_if_any()
    return chosen or set(_UPDATABLE)


async def update_template(
    pool: asyncpg.Pool,
    app_id: str,
    template: template_pb2.Template,
    mask: Sequence[str],
    now: datetime,
) -> template_pb2.Template:
    """Change a template, making a new version.

    Raises:
        InvalidArgument: A bad field or mask path.
        NotFound: The app has no such template.
        AlreadyExists: The new display name is taken.
    """
    parsed = require_uuid("template.template_id", template.template_id, "template id")
    paths = _normalize_mask(mask)
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            _SELECT
            + """
            WHERE t.app_id = $1 AND t.template_id = $2 AND v.version = t.latest_version
            FOR UPDATE OF t
            """,
            app_id,
            parsed,
        )
        if row is None:
            raise template_not_found(template.template_id)
        current = _from_row(row)
        merged = template_pb2.Template()
        merged.CopyFrom(current)
        for path in paths:
            if path in ("display_name", "description"):
                setattr(merged, path, getattr(template, path))
            elif path == "content":
                merged.content.CopyFrom(template.content)
            elif path == "locales":
                merged.ClearField("locales")
                for locale, content in template.locales.items():
                    merged.locales[locale].CopyFrom(content)
            else:  # locales.<locale>: set it, or remove it when absent from the request
                locale = path.split(".", 1)[1]
                if locale in template.locales:
                    merged.locales[locale].CopyFrom(template.locales[locale])
                else:
                    merged.locales.pop(locale, None)
        _validate(merged, "template", creating=False)
        stored = _normalized(merged)
        version = current.version + 1
        try:
            await conn.execute(
                """
                UPDATE templates SET display_name = $3, latest_version = $4, update_time = $5
                WHERE app_id = $1 AND template_id = $2
                """,
                app_id,
                parsed,
                stored.display_name,
                version,
                now,
            )
        except asyncpg.UniqueViolationError:
            raise _name_taken(stored.display_name) from None
        await conn.execute(
            "INSERT INTO template_versions VALUES ($1, $2, $3, $4, $5)",
            app_id,
            parsed,
            version,
            _body(stored),
            now,
        )
    return await get_template(pool, app_id, str(parsed))


async def delete_template(pool: asyncpg.Pool, app_id: str, template_id: str) -> None:
    """Delete a template and all its versions.

    Raises:
        NotFound: The app has no such template.
    """
    parsed = require_uuid("template_id", template_id, "template id")
    result = await pool.execute(
        "DELETE FROM templates WHERE app_id = $1 AND template_id = $2", app_id, parsed
    )
    if result.endswith(" 0"):
        raise template_not_found(template_id)


async def load_templates(
    conn: DBConnection, app_id: str, wanted: Iterable[tuple[str, int]]
) -> dict[tuple[str, int], template_pb2.Template]:
    """Templates by ``(template_id, version)`` (0: latest) in one statement; missing ones are
    left out."""
    pairs = sorted({pair for pair in wanted if _is_uuid(pair[0])})
    if not pairs:
        return {}
    rows = await conn.fetch(
        _SELECT
        + """
        JOIN unnest($2::uuid[], $3::int[]) AS w(template_id, version)
          ON w.template_id = t.template_id
         AND v.version = CASE WHEN w.version = 0 THEN t.latest_version ELSE w.version END
        WHERE t.app_id = $1
        """,
        app_id,
        [uuid.UUID(pair[0]) for pair in pairs],
        [pair[1] for pair in pairs],
    )
    found: dict[tuple[str, int], template_pb2.Template] = {}
    for row in rows:
        template = _from_row(row)
        for template_id, version in pairs:
            wanted_version = version or row["latest_version"]
            if uuid.UUID(template_id) == row["template_id"] and wanted_version == template.version:
                found[(template_id, version)] = template
    return found


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def choose_content(
    template: template_pb2.Template, language: str
) -> tuple[template_pb2.MessageContent, str]:
    """The content for a user whose language is ``language``: exact locale, the language alone,
    then the default. Returns the content and the locale used (``""`` for the default)."""
    wanted = normalize_locale(language) if language else None
    if wanted and template.locales:
        by_lower = {locale.lower(): locale for locale in template.locales}
        for candidate in (wanted, wanted.split("-", 1)[0]):
            key = by_lower.get(candidate.lower())
            if key is not None:
                return template.locales[key], key
    return template.content, ""


def utc_now() -> datetime:
    """Now, in UTC (tests inject their own)."""
    return datetime.now(UTC)
