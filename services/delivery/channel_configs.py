"""Channel configuration per app: provider credentials (checked, encrypted at rest) and limits.

Saving runs the provider adapter's ``check_credentials`` first, so a configuration that could
never send is refused with INVALID_ARGUMENT naming ``channel_config.credentials``. Credentials
are sealed with AES-256-GCM bound to ``<app_id>/<channel>`` and never returned: readers see only
the names of the fields that are set.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from tidings.delivery.v1 import channel_pb2

from services.delivery import channels
from services.delivery.app_settings import ensure_app
from services.delivery.providers.base import Channel, CredentialsError
from services.delivery.providers.registry import Adapters
from services.delivery.render import struct_variables
from services.delivery.secrets_box import SecretBox
from services.runtime.db import DBConnection
from services.runtime.errors import FailedPrecondition, FieldViolations, NotFound
from services.runtime.key_rotation import SealedColumn

__all__ = [
    "ChannelConfig",
    "delete_config",
    "get_config",
    "list_configs",
    "load_configs",
    "update_config",
]

_UPDATABLE = frozenset({"credentials", "disabled", "rate_limit_per_second"})
MAX_RATE = 100_000.0


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    """One app's configuration of one channel, credentials opened."""

    app_id: str
    channel: Channel
    provider: str
    credentials: Mapping[str, Any]
    credential_fields: tuple[str, ...]
    disabled: bool
    rate_limit: float
    create_time: datetime
    update_time: datetime

    def to_proto(self) -> channel_pb2.ChannelConfig:
        """The configuration as the API shows it (no credentials)."""
        out = channel_pb2.ChannelConfig(
            channel=channels.channel_proto(self.channel.value),  # type: ignore[arg-type]
            provider=self.provider,
            credential_fields=list(self.credential_fields),
            disabled=self.disabled,
            rate_limit_per_second=self.rate_limit,
        )
        out.create_time.FromDatetime(self.create_time)
        out.update_time.FromDatetime(self.update_time)
        return out


def _context(app_id: str, channel: Channel) -> str:
    return f"{app_id}/{channel.value}"


#: The sealed column of ``channel_configs`` (see :mod:`services.runtime.key_rotation`).
SEALED = SealedColumn(
    "channel_configs",
    ("app_id", "channel"),
    "credentials",
    lambda row: _context(row["app_id"], Channel(row["channel"])),
)


def _deliverable(field: str, number: int) -> Channel:
    name = channels.channel_name(number)
    violations = FieldViolations()
    if name is None:
        violations.add(field, "required: the channel to configure", reason="REQUIRED")
    elif name in (channels.PUSH, channels.IN_APP):
        violations.add(field, f"{name} has no provider to configure")
    violations.raise_if_any()
    assert name is not None
    return Channel(name)


def _not_configured(channel: Channel) -> NotFound:
    return NotFound(
        f"the {channel.value} channel is not configured",
        reason="CHANNEL_NOT_CONFIGURED",
        metadata={"channel": channel.value},
    )


def _from_row(row: asyncpg.Record, box: SecretBox) -> ChannelConfig:
    channel = Channel(row["channel"])
    credentials = json.loads(box.open(row["credentials"], _context(row["app_id"], channel)))
    return ChannelConfig(
        app_id=row["app_id"],
        channel=channel,
        provider=row["provider"],
        credentials=credentials,
        credential_fields=tuple(row["credential_fields"]),
        disabled=row["disabled"],
        rate_limit=row["rate_limit"],
        create_time=row["create_time"],
        update_time=row["update_time"],
    )


async def update_config(
    pool: asyncpg.Pool,
    box: SecretBox,
    adapters: Adapters,
    app_id: str,
    config: channel_pb2.ChannelConfig,
    mask: Sequence[str],
    now: datetime,
) -> ChannelConfig:
    """Create or change the configuration of a channel.

    Raises:
        InvalidArgument: A bad channel, mask path, rate, or credentials the adapter refuses.
        FailedPrecondition: The channel's adapter is not available in this build
            (CHANNEL_UNAVAILABLE).
    """
    channel = _deliverable("channel_config.channel", config.channel)
    violations = FieldViolations()
    paths = set(mask)
    for path in paths - _UPDATABLE:
        violations.add("update_mask", f"{path!r} cannot be updated")
    paths = paths or set(_UPDATABLE)
    if config.rate_limit_per_second < 0 or config.rate_limit_per_second > MAX_RATE:
        violations.add("channel_config.rate_limit_per_second", f"between 0 and {MAX_RATE:g}")
    violations.raise_if_any()
    adapter = adapters.get(channel)
    if adapter is None:
        raise FailedPrecondition(
            f"the {channel.value} provider is not available in this deployment",
            reason="CHANNEL_UNAVAILABLE",
            metadata={"channel": channel.value},
        )
    credentials: dict[str, Any] | None = None
    if "credentials" in paths:
        # Struct numbers are doubles; adapters expect a port of 2525, not 2525.0.
        credentials = struct_variables(config.credentials)
        try:
            adapter.check_credentials(credentials)
        except CredentialsError as exc:
            violations.add("channel_config.credentials", str(exc), reason="INVALID_CREDENTIALS")
            violations.raise_if_any(reason="INVALID_CREDENTIALS")
    async with pool.acquire() as conn, conn.transaction():
        await ensure_app(conn, app_id)
        row = await conn.fetchrow(
            "SELECT * FROM channel_configs WHERE app_id = $1 AND channel = $2 FOR UPDATE",
            app_id,
            channel.value,
        )
        if row is None and credentials is None:
            violations.add(
                "channel_config.credentials",
                "required to configure a channel",
                reason="REQUIRED",
            )
            violations.raise_if_any()
        current = _from_row(row, box) if row is not None else None
        disabled = (
            config.disabled if "disabled" in paths else (current.disabled if current else False)
        )
        rate = (
            config.rate_limit_per_second
            if "rate_limit_per_second" in paths
            else (current.rate_limit if current else 0.0)
        )
        stored = credentials if credentials is not None else dict(current.credentials)  # type: ignore[union-attr]
        sealed = box.seal(json.dumps(stored).encode(), _context(app_id, channel))
        saved = await conn.fetchrow(
            """
            INSERT INTO channel_configs (app_id, channel, provider, credentials, credential_fields,
                                         disabled, rate_limit, create_time, update_time)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)
            ON CONFLICT (app_id, channel) DO UPDATE SET
                credentials = EXCLUDED.credentials,
                credential_fields = EXCLUDED.credential_fields,
                disabled = EXCLUDED.disabled, rate_limit = EXCLUDED.rate_limit,
                update_time = EXCLUDED.update_time
            RETURNING *
            """,
            app_id,
            channel.value,
            channels.PROVIDERS[channel],
            sealed,
            sorted(stored),
            disabled,
            rate,
            now,
        )
    assert saved is not None
    return _from_row(saved, box)


async def get_config(pool: asyncpg.Pool, box: SecretBox, app_id: str, number: int) -> ChannelConfig:
    """One channel's configuration.

    Raises:
        NotFound: The channel is not configured (CHANNEL_NOT_CONFIGURED).
    """
    channel = _deliverable("channel", number)
    row = await pool.fetchrow(
        "SELECT * FROM channel_configs WHERE app_id = $1 AND channel = $2", app_id, channel.value
    )
    if row is None:
        raise _not_configured(channel)
    return _from_row(row, box)


async def list_configs(pool: asyncpg.Pool, box: SecretBox, app_id: str) -> list[ChannelConfig]:
    """Every configured channel of the app."""
    rows = await pool.fetch(
        "SELECT * FROM channel_configs WHERE app_id = $1 ORDER BY channel", app_id
    )
    return [_from_row(row, box) for row in rows]


async def delete_config(pool: asyncpg.Pool, app_id: str, number: int) -> None:
    """Remove a channel's configuration.

    Raises:
        NotFound: The channel is not configured.
    """
    channel = _deliverable("channel", number)
    result = await pool.execute(
        "DELETE FROM channel_configs WHERE app_id = $1 AND channel = $2", app_id, channel.value
    )
    if result.endswith(" 0"):
        raise _not_configured(channel)


async def load_configs(
    conn: DBConnection, box: SecretBox, app_ids: Sequence[str]
) -> dict[tuple[str, Channel], ChannelConfig]:
    """The configurations of several apps, by (app, channel), in one statement."""
    rows = await conn.fetch(
        "SELECT * FROM channel_configs WHERE app_id = ANY($1::text[])", list(set(app_ids))
    )
    configs = {}
    for row in rows:
        config = _from_row(row, box)
        configs[(config.app_id, config.channel)] = config
    return configs
