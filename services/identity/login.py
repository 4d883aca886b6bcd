"""Login and Logout: identifying the holder of a device, and detaching it again.

A profile is **anonymous** while it has no external id (OneSignal's rule): what
CreateSubscription makes for a device nobody has claimed yet, which may carry aliases (an SDK's
own ids); one with an external id is **identified**.

``Login(subscription, external_id)``:

* the subscription's holder already has that external id → nothing changes (idempotent);
* the holder is identified as someone else → FAILED_PRECONDITION ``USER_ALREADY_IDENTIFIED``:
  two identified users are never merged, and a device is never silently switched between them
  (Logout first, or AssignSubscription with a server key);
* the holder is anonymous and nobody has that external id → the anonymous profile becomes the
  user (its external id is set);
* the holder is anonymous and a user has that external id → the anonymous profile is **merged**
  into the known one, in one transaction: the subscription moves (evicting the known user's
  least recently active push subscription if it is at the cap; RESOURCE_EXHAUSTED if all 20 are
  addresses); the anonymous profile's other subscriptions move too, most recently active first,
  while the known user has room, and the rest are deleted; its aliases move while the known
  user has fewer than 10 and does not have that label already; attributes the known profile
  lacks are filled from it (the known profile's values win) while it holds fewer than 100
  custom attributes, in name order, the rest being dropped; its stored events move; a
  ``user_merges`` row records who (the key), from, into and when; the anonymous profile is
  deleted; ``USER_MERGED`` (with ``merged_user_id`` and the fields filled) is published.

``Logout(subscription)`` moves the subscription to a fresh anonymous profile (nothing if it is
already held by an anonymous one).

A successful Login counts as the device's activity (``last_active_time``).

Client keys may call both, for the subscription they registered, only if the app's
``allow_client_login`` setting is on; that check comes before any other.

A client key is public (it ships in every copy of the app), so by itself it proves nothing about
who holds the device: with client login allowed and nothing else, anyone could log their device
in as any customer and be merged into them (PEERS item 11: merges only from trusted callers).
An app that sets a **login secret** closes that: its backend, which knows who signed in, gives
the SDK ``external_id_proof`` = hex HMAC-SHA256(secret, external_id), and a client key's Login
without the right proof is refused (PERMISSION_DENIED ``EXTERNAL_ID_PROOF_INVALID``, naming
``external_id_proof``) before anything is read or changed. Server keys are trusted and never
need one. Apps without a secret keep the old, unproven behaviour (docs/identity.md warns).

Concurrency: the users involved are locked in user id order, then the subscription, and what
was read before locking is checked again (a concurrent Login may have merged or identified the
holder meanwhile, in which case the work starts over), so concurrent logins of one device
neither deadlock nor merge twice.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from tidings.events.v1.identity_change_pb2 import IdentityChange

from services.identity import apps, apps_store, changes, events_store, users_store
from services.identity import subscriptions_store as store
from services.identity.access import AppCaller
from services.identity.subscriptions import (
    MAX_SUBSCRIPTIONS_PER_USER,
    Retry,
    check_subscription_id,
    choose_evictions,
    parse_subscription_id,
    retrying_transaction,
    subscription_fact,
    subscription_not_found,
    unassign_subscription,
)
from services.identity.subscriptions_store import Subscription
from services.identity.users import MAX_ALIASES, MAX_ATTRIBUTES
from services.identity.validation import check_external_id
from services.runtime.db import DBConnection
from services.runtime.errors import (
    FailedPrecondition,
    FieldViolation,
    FieldViolations,
    PermissionDenied,
)

__all__ = ["LoginResult", "login", "login_proof", "logout", "plan_merge"]


@dataclass(frozen=True, slots=True)
class LoginResult:
    """What a Login did.

    Attributes:
        user_id: The user who now holds the subscription.
        merged_user_id: The anonymous profile folded into it, if one was.
    """

    user_id: uuid.UUID
    merged_user_id: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class MergePlan:
    """Which subscriptions a merge evicts from the known user, moves, and drops.

    Attributes:
        evict: The known user's push subscriptions deleted to make room for the device.
        move: The anonymous profile's subscriptions that move (the device's first).
        drop: The anonymous profile's subscriptions that do not fit and are deleted.
    """

    evict: list[Subscription]
    move: list[Subscription]
    drop: list[Subscription]


def plan_merge(
    device: Subscription,
    known_held: list[Subscription],
    anonymous_held: list[Subscription],
    *,
    limit: int = MAX_SUBSCRIPTIONS_PER_USER,
) -> MergePlan:
    """Decide where every subscription goes when an anonymous profile is folded in.

    The device being logged in must move, evicting if needed; the anonymous profile's other
    subscriptions only fill the room left (most recently active first) and never evict.

    Args:
        device: The subscription being logged in.
        known_held: The known user's subscriptions.
        anonymous_held: The anonymous profile's subscriptions (``device`` among them).
        limit: The per-user cap.

    Raises:
        ResourceExhausted: The known user's subscriptions are all addresses and at the cap.
    """
    evict = choose_evictions(known_held, adding=1, limit=limit, field="external_id")
    room = limit - (len(known_held) - len(evict)) - 1
    others = sorted(
        (s for s in anonymous_held if s.subscription_id != device.subscription_id),
        key=lambda s: (s.last_active_time, s.create_time),
        reverse=True,
    )
    return MergePlan(evict=evict, move=[device, *others[:room]], drop=others[room:])


async def _require_login_allowed(conn: DBConnection, caller: AppCaller) -> None:
    """Refuse a client key unless its app allows client-side login."""
    if not caller.is_client:
        return
    settings = await apps_store.get_app_settings(conn, caller.app_id)
    if not settings.allow_client_login:
        raise PermissionDenied(
            "this app does not let client keys log users in or out; call it from your server, "
            "or turn on the app's allow_client_login setting",
            reason="CLIENT_LOGIN_DISABLED",
        )


async def _proof_key(pool: asyncpg.Pool, caller: AppCaller) -> bytes | None:
    """Refuse a client key unless its app allows client-side login; then the key its Login
    proofs are made with (None: the caller needs no proof)."""
    if not caller.is_client:
        return None
    async with pool.acquire() as conn:
        await _require_login_allowed(conn, caller)
        return await apps.login_secret(conn, caller.app_id)


def login_proof(secret: bytes, external_id: str) -> str:
    """The ``external_id_proof`` an app's backend computes: hex HMAC-SHA256 of the external id
    (UTF-8) under the app's login secret."""
    return hmac.new(secret, external_id.encode(), hashlib.sha256).hexdigest()


def _check_proof(secret: bytes, external_id: str, proof: str) -> None:
    """Refuse a Login whose proof is missing or not the one ``secret`` makes for ``external_id``.

    Raises:
        PermissionDenied: ``EXTERNAL_ID_PROOF_INVALID``, naming ``external_id_proof``.
    """
    expected = login_proof(secret, external_id).encode()
    # Constant time; on bytes, since compare_digest refuses str with non-ASCII characters.
    if proof and hmac.compare_digest(expected, proof.lower().encode()):
        return
    problem = (
        "required: the app has a login secret"
        if not proof
        else "does not match external_id under the app's login secret"
    )
    raise PermissionDenied(
        "this app requires client logins to carry external_id_proof, the hex HMAC-SHA256 of "
        "external_id under the app's login secret, computed by the app's backend",
        reason="EXTERNAL_ID_PROOF_INVALID",
        field_violations=[FieldViolation("external_id_proof", problem)],
    )


async def login(
    pool: asyncpg.Pool,
    caller: AppCaller,
    subscription_id: str,
    external_id: str,
    at: datetime,
    *,
    external_id_proof: str = "",
) -> LoginResult:
    """Identify the holder of a subscription as ``external_id`` (see the module doc).

    Args:
        pool: The identity database.
        caller: Who calls.
        subscription_id: The device's subscription, as sent.
        external_id: The customer's id in the caller's CRM.
        at: Now.
        external_id_proof: The app backend's proof for ``external_id`` (see
            :func:`login_proof`); checked for client keys of apps with a login secret.

    Returns:
        Who holds the subscription now, and whom it merged.

    Raises:
        PermissionDenied: ``CLIENT_LOGIN_DISABLED``: a client key, and the app does not allow
            it; ``EXTERNAL_ID_PROOF_INVALID``: a client key, the app has a login secret, and
            the proof is missing or wrong.
        FailedPrecondition: ``LOGIN_SECRET_UNREADABLE``: the app's secret cannot be opened.
        InvalidArgument: A missing or malformed subscription id or external id.
        NotFound: No such subscription in the caller's app.
        FailedPrecondition: ``USER_ALREADY_IDENTIFIED``: the holder has another external id.
        ResourceExhausted: The known user's subscriptions are all addresses and at the cap.
    """
    proof_key = await _proof_key(pool, caller)
    violations = FieldViolations()
    parsed = check_subscription_id(subscription_id, "subscription_id", violations)
    check_external_id(external_id, "external_id", violations)
    violations.raise_if_any()
    assert parsed is not None
    if proof_key is not None:
        _check_proof(proof_key, external_id, external_id_proof)
    return await retrying_transaction(
        pool, lambda conn: _login(conn, caller, parsed, external_id, at)
    )


async def _login(
    conn: DBConnection,
    caller: AppCaller,
    subscription_id: uuid.UUID,
    external_id: str,
    at: datetime,
) -> LoginResult:
    app_id = caller.app_id
    seen = await store.get(conn, app_id, subscription_id)
    if seen is None:
        raise subscription_not_found(subscription_id)
    known = (await users_store.users_by_external_id(conn, app_id, [external_id])).get(external_id)
    wanted = [seen.user_id] if known is None else [seen.user_id, known]
    users = await users_store.lock_profiles(conn, app_id, wanted)
    device = await store.get(conn, app_id, subscription_id, for_update=True)
    if device is None:
        raise subscription_not_found(subscription_id)
    if device.user_id != seen.user_id or not set(wanted) <= users.keys():
        raise Retry  # merged, moved or erased since we looked: look again
    holder = device.user_id
    # Logging in is the device's activity (it orders evictions at the cap); it commits only
    # with a successful Login.
    await store.record_activity(conn, {(app_id, subscription_id): at}, fresh_after=at)
    if users[holder].external_id == external_id:
        return LoginResult(holder)
    if users[holder].external_id is not None:
        raise FailedPrecondition(
            "the subscription's user is already identified by another external_id; two "
            "identified users are never merged: Logout first, then Login",
            reason="USER_ALREADY_IDENTIFIED",
            metadata={"subscription_id": str(subscription_id)},
            field_violations=[
                FieldViolation(
                    "external_id", "the subscription's user has another external_id already"
                )
            ],
        )
    if known is None:
        if not await store.set_external_id(conn, app_id, holder, external_id, at):
            raise Retry  # another profile took the external id meanwhile: merge into it
        await changes.publish(
            conn,
            [
                changes.change(
                    changes.Kind.KIND_USER_UPDATED,
                    app_id=app_id,
                    user_id=holder,
                    at=at,
                    external_id=external_id,
                    changed_fields=["external_id"],
                )
            ],
        )
        return LoginResult(holder)
    await _merge(conn, caller, device, known, external_id, at)
    return LoginResult(known, merged_user_id=holder)


async def _merge(
    conn: DBConnection,
    caller: AppCaller,
    device: Subscription,
    into: uuid.UUID,
    external_id: str,
    at: datetime,
) -> None:
    """Fold the device's anonymous holder into ``into`` (both locked, with the device)."""
    app_id, source = caller.app_id, device.user_id
    held = await store.fetch_for_users(conn, app_id, [into, source])
    plan = plan_merge(device, held[into], held[source])
    facts: list[IdentityChange] = []
    evicted = await store.delete(conn, app_id, [s.subscription_id for s in plan.evict])
    facts += [subscription_fact(changes.Kind.KIND_SUBSCRIPTION_REMOVED, s, at) for s in evicted]
    moved = await store.move(conn, app_id, [s.subscription_id for s in plan.move], into, at)
    facts += [
        subscription_fact(changes.Kind.KIND_SUBSCRIPTION_CHANGED, s, at, ["user_id"]) for s in moved
    ]
    dropped = await store.delete(conn, app_id, [s.subscription_id for s in plan.drop])
    facts += [subscription_fact(changes.Kind.KIND_SUBSCRIPTION_REMOVED, s, at) for s in dropped]
    filled = await store.merge_profile(
        conn, app_id, source, into, at, max_attributes=MAX_ATTRIBUTES
    )
    room = MAX_ALIASES - await users_store.count_aliases(conn, app_id, into)
    aliases = await store.move_aliases(conn, app_id, source, into, room)
    await store.record_merge(
        conn,
        app_id=app_id,
        from_user_id=source,
        into_user_id=into,
        subscription_id=device.subscription_id,
        key_id=caller.key_id,
        at=at,
    )
    # After the merge record: the events consumer redirects late events of `source` by it.
    await events_store.move_to_user(conn, app_id, source, into)
    await store.delete_merged_user(conn, app_id, source)
    facts.append(
        changes.change(
            changes.Kind.KIND_USER_MERGED,
            app_id=app_id,
            user_id=into,
            at=at,
            external_id=external_id,
            merged_user_id=source,
            changed_fields=[*filled, *(f"aliases.{label}" for label in aliases)],
        )
    )
    await changes.publish(conn, facts)


async def logout(
    pool: asyncpg.Pool, caller: AppCaller, subscription_id: str, at: datetime
) -> Subscription:
    """Detach a subscription from its user onto a fresh anonymous profile.

    Args:
        pool: The identity database.
        caller: Who calls.
        subscription_id: The device's subscription, as sent.
        at: Now.

    Returns:
        The subscription, as now held.

    Raises:
        PermissionDenied: ``CLIENT_LOGIN_DISABLED``: a client key, and the app does not allow it.
        InvalidArgument: A missing or malformed subscription id.
        NotFound: No such subscription in the caller's app.
    """
    if caller.is_client:
        async with pool.acquire() as conn:
            await _require_login_allowed(conn, caller)
    return await unassign_subscription(pool, caller, parse_subscription_id(subscription_id), at)
