"""PII customer fields: flipping the flag, finishing flips, and key rotation of sealed values.

* **Flip** (:func:`update_customer_field`, and :func:`settle_field`): the new flag commits
  first (writers seal or stop sealing from then on), marked *unsettled*; then, once every
  transaction that may have read the old flag has ended, the field's stored values are
  converted in batches (false → true seals, true → false opens), each batch its own
  transaction, and the field is marked settled. Values are self-describing
  (:mod:`services.identity.pii`), so readers are right at every point in between; a crash
  leaves the field unsettled and the next start-up finishes it (:func:`run_pii_keeper`).
* **Segments**: only EXISTS / NOT_EXISTS apply to a PII field, so turning the flag on is
  refused (FAILED_PRECONDITION) while a segment compares the field's values.
* **Rotation**: ``TIDINGS_IDENTITY_SECRET_KEY=new,old``: at start-up and every hour
  (:data:`services.runtime.key_rotation.ROTATION_INTERVAL_S`) every sealed value only an older
  key opens is re-sealed with the newest; then ``old`` can be dropped.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg

from services.identity import apps_store, pii, pii_store, segments, segments_store
from services.identity.fields import MAX_DESCRIPTION_LENGTH, CustomerField, attribute_name_problem
from services.identity.segment_conditions import AttributeCondition, leaves
from services.identity.segment_sql import CUSTOM_PREFIX
from services.identity.segment_validation import PII_OPERATORS
from services.identity.validation import check_mask_paths, text_problem
from services.runtime import key_rotation
from services.runtime.app import ServiceContext
from services.runtime.db import DBConnection
from services.runtime.errors import FailedPrecondition, FieldViolation, FieldViolations, NotFound
from services.runtime.key_rotation import ROTATION_INTERVAL_S
from services.runtime.secrets_box import SecretBoxError

__all__ = [
    "BATCH_SIZE",
    "check_segments_allow_pii",
    "reseal_all",
    "run_pii_keeper",
    "settle_field",
    "settle_unsettled",
    "update_customer_field",
]

log = logging.getLogger(__name__)

#: Users converted or re-sealed per statement (and per transaction).
BATCH_SIZE = 1_000
#: How long a flip waits for transactions that may have read the old flag (tenths of a
#: second) before converting anyway; the keeper converts again at the next start-up.
_WAIT_ATTEMPTS = 300

_UPDATABLE = ("description", "pii")


async def check_segments_allow_pii(conn: DBConnection, app_id: str, name: str) -> None:
    """Refuse to make ``name`` PII while a segment compares its values.

    Raises:
        FailedPrecondition: ``PII_FIELD_IN_SEGMENT``, naming the segments.
    """
    field = f"{CUSTOM_PREFIX}{name}"
    comparing = []
    for record in await segments_store.lock_dynamic_segments(conn, app_id):
        for leaf in leaves(segments.segment_condition(record)):
            if (
                isinstance(leaf, AttributeCondition)
                and leaf.field == field
                and leaf.operator not in PII_OPERATORS
            ):
                comparing.append(record)
                break
    if comparing:
        names = ", ".join(f"{r.display_name!r} ({r.segment_id})" for r in comparing[:10])
        raise FailedPrecondition(
            f"segments compare the values of {name!r} ({names}); a PII field's values are "
            "encrypted, so only EXISTS / NOT_EXISTS conditions can stay: change those segments "
            "first",
            reason="PII_FIELD_IN_SEGMENT",
            field_violations=[FieldViolation("field.pii", f"used by {len(comparing)} segments")],
            metadata={"segments": ",".join(str(r.segment_id) for r in comparing)},
        )


async def update_customer_field(
    conn: DBConnection,
    app_id: str,
    definition: CustomerField,
    mask: Sequence[str],
) -> CustomerField:
    """Change a field's description or PII flag; a flipped flag converts the stored values
    before this returns.

    Args:
        conn: A connection not in a transaction.
        app_id: The caller's app.
        definition: The field's name with the new description and flag.
        mask: The fields to change (``description``, ``pii``); empty means both.

    Raises:
        InvalidArgument: ``field.name`` missing or malformed, ``update_mask`` naming something
            else, a bad ``field.description``.
        NotFound: ``CUSTOMER_FIELD_NOT_FOUND``.
        FailedPrecondition: ``PII_FIELD_IN_SEGMENT`` (see :func:`check_segments_allow_pii`).
    """
    violations = FieldViolations()
    if not definition.name:
        violations.add("field.name", "required", reason="REQUIRED")
    elif (problem := attribute_name_problem(definition.name)) is not None:
        violations.add("field.name", problem, reason="INVALID_FIELD_NAME")
    check_mask_paths(mask, _UPDATABLE, violations)
    paths = set(mask) or set(_UPDATABLE)
    if "description" in paths:
        problem = text_problem(definition.description, max_length=MAX_DESCRIPTION_LENGTH)
        if problem is not None:
            violations.add("field.description", problem, reason="INVALID_TEXT")
    violations.raise_if_any()
    async with conn.transaction():
        # Serialised with segment definitions: no segment comparing the field can be saved
        # between the check and the flag.
        await segments.lock_definitions(conn, app_id)
        current = await pii_store.lock_field(conn, app_id, definition.name)
        if current is None:
            raise NotFound(
                f"no customer field {definition.name[:64]!r}",
                reason="CUSTOMER_FIELD_NOT_FOUND",
                metadata={"name": definition.name[:64]},
            )
        new_pii = definition.pii if "pii" in paths else current.pii
        if new_pii and not current.pii:
            await check_segments_allow_pii(conn, app_id, definition.name)
        stored = await pii_store.set_field(
            conn,
            app_id,
            definition.name,
            description=definition.description if "description" in paths else current.description,
            pii=new_pii,
        )
    if new_pii != current.pii:
        await settle_field(conn, app_id, definition.name, to_pii=new_pii, wait_for_readers=True)
    return stored


async def settle_field(
    conn: DBConnection, app_id: str, name: str, *, to_pii: bool, wait_for_readers: bool = False
) -> int:
    """Convert every stored value of a flipped field to the form ``to_pii`` says, in batches,
    then mark the field settled.

    Args:
        conn: A connection not in a transaction.
        app_id: The app.
        name: The field.
        to_pii: Its flag now.
        wait_for_readers: Right after the flag committed: first wait for the transactions
            older than now, which may have read the old flag and not written yet (a flip found
            at start-up needs no wait).

    Returns:
        How many values were converted.
    """
    if wait_for_readers and not await pii_store.wait_for_older_transactions(
        conn, await conn.fetchval("SELECT clock_timestamp()"), attempts=_WAIT_ATTEMPTS
    ):
        log.warning(
            "converting %s of app %s while older transactions still run; the next start-up "
            "converts what they write",
            name,
            app_id,
        )
    box = pii.box()
    converted = 0
    after = uuid.UUID(int=0)
    complete = True
    while True:
        rows = await pii_store.stale_values(
            conn, app_id, name, sealed=not to_pii, after=after, limit=BATCH_SIZE
        )
        if not rows:
            break
        changes: list[tuple[uuid.UUID, Any, Any]] = []
        for row in rows:
            where = pii.context(app_id, row["user_id"], name)
            if to_pii:
                changes.append((row["user_id"], row["value"], box.seal_value(row["value"], where)))
                continue
            try:
                changes.append((row["user_id"], row["value"], box.open_value(row["value"], where)))
            except (SecretBoxError, ValueError):
                complete = False
                log.error(
                    "a value of %s (app %s) opens with no listed key; left sealed", name, app_id
                )
        converted += await pii_store.rewrite_values(conn, app_id, name, changes)
        after = rows[-1]["user_id"]
    if complete:
        await pii_store.settle(conn, app_id, name, to_pii)
    return converted


async def settle_unsettled(conn: DBConnection) -> int:
    """Finish every flip a crash (or a lost connection) left unfinished; returns the values
    converted."""
    converted = 0
    for field in await pii_store.unsettled_fields(conn):
        converted += await settle_field(conn, field.app_id, field.name, to_pii=field.pii)
    return converted


async def reseal_all(conn: DBConnection) -> int:
    """Re-seal, with the newest key, every PII value only an older key opens.

    Returns:
        How many users' values were re-sealed (0 at once when only one key is listed).
    """
    box = pii.box()
    if not box.rotating:
        return 0
    resealed = 0
    for app_id, names in (await pii_store.pii_fields_by_app(conn)).items():
        after = uuid.UUID(int=0)
        while True:
            rows = await pii_store.users_holding(conn, app_id, names, after=after, limit=BATCH_SIZE)
            if not rows:
                break
            changes = []
            for row in rows:
                fresh = _resealed(box, app_id, row["user_id"], row["attributes"], names)
                if fresh:
                    changes.append((row["user_id"], row["attributes"], fresh))
            resealed += await pii_store.write_attribute_maps(conn, app_id, changes)
            after = rows[-1]["user_id"]
    return resealed


def _resealed(
    box: pii.PiiBox, app_id: str, user_id: uuid.UUID, attributes: dict[str, Any], names: list[str]
) -> dict[str, Any]:
    fresh = {}
    for name in names:
        value = attributes.get(name)
        if not isinstance(value, dict):
            continue  # plain (not sealed)
        try:
            again = box.reseal_value(value, pii.context(app_id, user_id, name))
        except (SecretBoxError, ValueError):
            log.error(
                "a value of %s (app %s) opens with no listed key; left as it is", name, app_id
            )
            continue
        if again is not None:
            fresh[name] = again
    return fresh


async def run_pii_keeper(ctx: ServiceContext) -> None:
    """Background task: at start-up and every hour, finish unfinished flips and re-seal values
    with the newest key (joins the runtime's key rotation schedule)."""
    while True:
        try:
            async with ctx.pool.acquire() as conn:
                converted = await settle_unsettled(conn)
                resealed = await reseal_all(conn)
            # Apps' login secrets are sealed with the same key.
            if pii.box().rotating:
                resealed += await key_rotation.reseal_all(
                    ctx.pool, pii.box(), [apps_store.LOGIN_SECRET_COLUMN]
                )
            if converted:
                ctx.log.info("finished PII flips: %d values converted", converted)
            if resealed:
                ctx.log.info(
                    "re-sealed %d users' PII values and login secrets with the newest key", resealed
                )
        except (OSError, asyncpg.PostgresError) as exc:
            ctx.log.warning("PII keeper pass failed (%s); trying again later", exc)
            await asyncio.sleep(10.0)
            continue
        await asyncio.sleep(ROTATION_INTERVAL_S)
