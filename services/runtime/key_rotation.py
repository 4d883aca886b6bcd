"""Moving stored secrets to the newest key of a :class:`SecretBox` (key rotation).

An operator rotates a service's secret key by listing the new material first in its setting
(``TIDINGS_DELIVERY_SECRET_KEY=new,old``) and restarting. The service's rotation task re-seals
every stored value that only an older key opens; once ``resealed`` reports 0, the old material
can be dropped from the setting. Each owner declares its sealed columns next to its SQL.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from services.runtime.app import ServiceContext
from services.runtime.secrets_box import SecretBox, SecretBoxError

__all__ = ["SealedColumn", "reseal_all", "run_key_rotation"]

log = logging.getLogger(__name__)

#: How often the task looks again (a restart with new material also triggers a pass).
ROTATION_INTERVAL_S = 3600.0


@dataclass(frozen=True, slots=True)
class SealedColumn:
    """A bytea column of sealed values.

    Attributes:
        table: The table (a constant of the owning module, never input).
        keys: Its primary-key columns.
        column: The sealed column.
        context: The associated data a row's value was sealed with.
    """

    table: str
    keys: tuple[str, ...]
    column: str
    context: Callable[[asyncpg.Record], str]


async def reseal_all(pool: asyncpg.Pool, box: SecretBox, columns: Sequence[SealedColumn]) -> int:
    """Re-seal, with the newest key, every value of ``columns`` sealed with an older one.

    Each update is conditional on the value read, so a concurrent write (a new credential)
    wins. A value no listed key opens is logged and left alone.

    Returns:
        How many values were re-sealed.
    """
    resealed = 0
    for sealed in columns:
        keys = ", ".join(sealed.keys)
        where = " AND ".join(f"{key} = ${index}" for index, key in enumerate(sealed.keys, 3))
        rows = await pool.fetch(f"SELECT {keys}, {sealed.column} FROM {sealed.table}")
        for row in rows:
            try:
                fresh = box.reseal(row[sealed.column], sealed.context(row))
            except SecretBoxError:
                log.error(
                    "a value of %s.%s opens with no listed key; left as it is",
                    sealed.table,
                    sealed.column,
                )
                continue
            if fresh is None:
                continue
            status = await pool.execute(
                f"UPDATE {sealed.table} SET {sealed.column} = $1"
                f" WHERE {sealed.column} = $2 AND {where}",
                fresh,
                row[sealed.column],
                *(row[key] for key in sealed.keys),
            )
            resealed += status == "UPDATE 1"
    return resealed


async def run_key_rotation(
    ctx: ServiceContext, box: SecretBox, columns: Sequence[SealedColumn]
) -> None:
    """Background task: :func:`reseal_all` at start-up, then every hour."""
    while True:
        resealed = await reseal_all(ctx.pool, box, columns)
        if resealed:
            log.info("re-sealed %d stored secrets with the newest key", resealed)
        await asyncio.sleep(ROTATION_INTERVAL_S)
