"""An app's delivery settings (frequency cap, quiet hours, default time zone) and their table.

The row also marks the app as known to this deployment: every write path (settings, templates,
channels, sends, broadcasts) ensures it exists, and workers skip fan-out records of apps
without one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

from services.runtime.db import DBConnection

__all__ = [
    "AppSettings",
    "CapAction",
    "ensure_app",
    "ensure_apps_exist",
    "get_settings",
    "known_apps",
    "save_settings",
    "settings_for",
]

CapAction = Literal["drop", "defer"]


@dataclass(frozen=True, slots=True)
class AppSettings:
    """Delivery settings of one app.

    Attributes:
        cap_max: Messages per user and channel within ``cap_window_seconds``; 0: no cap.
        cap_window_seconds: The rolling window.
        cap_action: What happens to a message over the cap.
        quiet_enabled: Whether quiet hours apply.
        quiet_start: Start of quiet hours, minutes after local midnight.
        quiet_end: End of quiet hours, minutes after local midnight.
        default_timezone: IANA zone for users without one; empty: UTC.
        update_time: When last changed (None before the first write).
    """

    app_id: str
    cap_max: int = 0
    cap_window_seconds: int = 0
    cap_action: CapAction = "drop"
    quiet_enabled: bool = False
    quiet_start: int = 0
    quiet_end: int = 0
    default_timezone: str = ""
    update_time: datetime | None = None

    def with_values(self, **values: object) -> AppSettings:
        """A copy with ``values`` replaced."""
        return replace(self, **values)  # type: ignore[arg-type]


_COLUMNS = (
    "app_id, cap_max, cap_window_seconds, cap_action, quiet_enabled, quiet_start, quiet_end, "
    "default_timezone, update_time"
)


def _from_row(row: object) -> AppSettings:
    return AppSettings(**dict(row))  # type: ignore[call-overload]


async def ensure_app(conn: DBConnection, app_id: str) -> None:
    """Make the app known to this deployment (idempotent)."""
    await conn.execute(
        "INSERT INTO app_settings (app_id) VALUES ($1) ON CONFLICT DO NOTHING", app_id
    )


async def ensure_apps_exist(conn: DBConnection, app_ids: Iterable[str]) -> None:
    """Like :func:`ensure_app`, for several apps in one statement."""
    await conn.execute(
        "INSERT INTO app_settings (app_id) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
        sorted(set(app_ids)),
    )


async def known_apps(conn: DBConnection, app_ids: Sequence[str]) -> set[str]:
    """Which of ``app_ids`` this deployment knows."""
    rows = await conn.fetch(
        "SELECT app_id FROM app_settings WHERE app_id = ANY($1::text[])", list(set(app_ids))
    )
    return {row["app_id"] for row in rows}


async def get_settings(conn: DBConnection, app_id: str) -> AppSettings:
    """The app's settings (defaults when it has none)."""
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM app_settings WHERE app_id = $1", app_id)
    return _from_row(row) if row is not None else AppSettings(app_id=app_id)


async def settings_for(conn: DBConnection, app_ids: Sequence[str]) -> dict[str, AppSettings]:
    """Settings of several apps in one statement (defaults for unknown ones)."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM app_settings WHERE app_id = ANY($1::text[])", list(set(app_ids))
    )
    found = {row["app_id"]: _from_row(row) for row in rows}
    return {app_id: found.get(app_id, AppSettings(app_id=app_id)) for app_id in app_ids}


async def save_settings(conn: DBConnection, settings: AppSettings) -> AppSettings:
    """Write the app's settings; returns them as stored."""
    row = await conn.fetchrow(
        f"""
        INSERT INTO app_settings (app_id, cap_max, cap_window_seconds, cap_action,
                                  quiet_enabled, quiet_start, quiet_end, default_timezone)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        ON CONFLICT (app_id) DO UPDATE SET
            cap_max = EXCLUDED.cap_max, cap_window_seconds = EXCLUDED.cap_window_seconds,
            cap_action = EXCLUDED.cap_action, quiet_enabled = EXCLUDED.quiet_enabled,
            quiet_start = EXCLUDED.quiet_start, quiet_end = EXCLUDED.quiet_end,
            default_timezone = EXCLUDED.default_timezone, update_time = now()
        RETURNING {_COLUMNS}
        """,
        settings.app_id,
        settings.cap_max,
        settings.cap_window_seconds,
        settings.cap_action,
        settings.quiet_enabled,
        settings.quiet_start,
        settings.quiet_end,
        settings.default_timezone,
    )
    return _from_row(row)
