"""Subscriptions: the devices and addresses through which a user is reached.

Rules (the proto comments of ``CreateSubscription`` and friends say the same to callers):

* **Types and tokens.** ``ios_push`` (an APNs device token: hex, stored lowercase),
  ``android_push`` (an FCM registration token), ``web_push`` (the push service's ``https``
  endpoint URL as token, plus the ``p256dh`` and ``auth`` keys), ``email`` (syntax-checked,
  stored lowercase so one address is one subscription), ``sms`` and ``whatsapp`` (an E.164
  number), ``telegram`` (a numeric chat id). The type never changes.
* **One profile per token.** ``(type, token)`` is unique per app. Registering a token again
  returns the existing subscription, refreshed (last active, device, keys, opt-in if given,
  and re-enabled if only a dead-token verdict had disabled it: the device just presented the
  token). When a server key names a ``user``, the subscription moves to that user. A client key
  re-registering an *address* (email, phone, chat id) someone already registered gets
  ALREADY_EXISTS: unlike a push token, an address is no proof of being its holder.
* **Retries.** A ``request_id`` (AIP-155, a UUID) makes a registration retryable: within
  :data:`REQUEST_ID_TTL`, a call with the id of an earlier one that asked the same (type,
  token, user) answers with the subscription that call registered, as it is now, without
  registering again, so an SDK whose call timed out after the commit learns its id. Knowing
  the id is the proof (it is as unguessable as the subscription id it returns); an id used for
  another registration is refused (INVALID_ARGUMENT ``REQUEST_ID_REUSED``).
* **Anonymous holders.** Without ``user``, a new subscription is held by a fresh anonymous
  profile (Login identifies it later). A profile is anonymous while it has no external id (it
  may carry aliases). Only server keys may name a user, assign or unassign.
* **At most** :data:`MAX_SUBSCRIPTIONS_PER_USER` **per user.** Adding one more to a user at the
  cap deletes the user's least recently active *push* subscription (push tokens churn with
  devices; addresses do not), with a ``SUBSCRIPTION_REMOVED`` change. A user whose subscriptions
  are all addresses is full: RESOURCE_EXHAUSTED.
* **Suppression list.** Deleting an unsubscribed subscription (or changing its token) keeps a
  keyed hash of its (type, token) (:mod:`services.identity.suppressions`): an import creating it
  again creates it unsubscribed. A registration here is consent: it is created as asked and
  the entry is dropped.
* **Changes.** Every change writes its facts to ``identity.changes`` in its own transaction:
  ``SUBSCRIPTION_CREATED``; ``SUBSCRIPTION_CHANGED`` (listing the fields that changed; a move
  is ``SUBSCRIPTION_REMOVED`` for the old holder and ``SUBSCRIPTION_CHANGED`` for the new);
  ``SUBSCRIPTION_DEACTIVATED`` when it gets disabled; ``SUBSCRIPTION_REMOVED`` when deleted or
  evicted. ``subscription_reachable`` is ``enabled and opted in``.

Concurrency: writers lock the users involved first (sorted by id), then the subscription, and
re-check what they read before locking; when it changed they start over
(:func:`retrying_transaction`), so racing registrations never put a token on two profiles and
never deadlock.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import re
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar
from urllib.parse import urlsplit

import asyncpg
from tidings.events.v1.identity_change_pb2 import IdentityChange

from services.identity import changes, refs, suppressions, users_store
from services.identity import subscriptions_store as store
from services.identity.access import AppCaller
from services.identity.subscriptions_store import (
    DeviceInfo,
    OptIn,
    Subscription,
    SubscriptionType,
    WebPushKeys,
)
from services.identity.validation import check_email, check_phone, check_text, is_placeholder_id
from services.runtime.db import DBConnection
from services.runtime.errors import (
    Aborted,
    AlreadyExists,
    FieldViolation,
    FieldViolations,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)

__all__ = [
    "CLIENT_UPDATE_PATHS",
    "DISABLED_BY_API",
    "MAX_SUBSCRIPTIONS_PER_USER",
    "REQUEST_ID_TTL",
    "UPDATE_PATHS",
    "NewSubscription",
    "Retry",
    "SubscriptionPatch",
    "assign_subscription",
    "check_may_choose_user",
    "check_request_id",
    "check_subscription_id",
    "choose_evictions",
    "create_subscription",
    "delete_subscription",
    "get_subscription",
    "make_room",
    "move_facts",
    "parse_subscription_id",
    "retrying_transaction",
    "subscription_fact",
    "subscription_not_found",
    "unassign_subscription",
    "update_subscription",
    "validate_new",
]

#: How long a CreateSubscription ``request_id`` is remembered (AIP-155).
REQUEST_ID_TTL = timedelta(hours=24)
#: Most subscriptions one user holds; see the module doc for what happens beyond.
MAX_SUBSCRIPTIONS_PER_USER = 20
#: ``disabled_reason`` of a subscription a server key disabled (a re-registration keeps it
#: disabled; only a dead-token verdict is lifted by presenting the token again).
DISABLED_BY_API = "disabled_by_api"

#: Fields UpdateSubscription may change (``device`` also per field: ``device.model``...).
UPDATE_PATHS = frozenset(
    {"opt_in", "opt_in_reason", "enabled", "device", "web_push_keys", "token"}
    | {f"device.{name}" for name in ("model", "os", "app_version", "sdk")}
)
#: What a client key may change: its consent and what its device knows. Not ``enabled``, which
#: is the operator's (or the provider's) verdict.
CLIENT_UPDATE_PATHS = UPDATE_PATHS - {"enabled"}

MAX_TOKEN_LENGTH = 4096
MAX_ENDPOINT_LENGTH = 2048
MAX_REASON_LENGTH = 200
MAX_DEVICE_FIELD_LENGTH = 200

_HEX = re.compile(r"[0-9a-fA-F]+")
_FCM_TOKEN = re.compile(r"[A-Za-z0-9_:.\-]+")
_CHAT_ID = re.compile(r"-?[1-9][0-9]{0,18}")
_BASE64URL = re.compile(r"[A-Za-z0-9_\-]+={0,2}")
_INT64_MAX = 2**63 - 1
_ATTEMPTS = 5

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class NewSubscription:
    """A subscription as a caller registers it (output-only fields are not part of it).

    Attributes:
        type: The channel kind; None when the caller left it unspecified (refused).
        token: Token, endpoint, address, number or chat id, as sent.
        web_push_keys: The web push keys, if sent.
        opt_in: The consent state, if specified.
        opt_in_reason: Why, if said.
        device: Device metadata, if sent.
    """

    type: SubscriptionType | None
    token: str
    web_push_keys: WebPushKeys | None = None
    opt_in: OptIn | None = None
    opt_in_reason: str = ""
    device: DeviceInfo | None = None


@dataclass(frozen=True, slots=True)
class SubscriptionPatch:
    """UpdateSubscription's new values and the mask saying which of them apply.

    Attributes:
        paths: The update mask's paths.
        values: The new values (fields outside ``paths`` are ignored; ``type`` too).
        enabled: The new ``enabled`` flag.
    """

    paths: frozenset[str]
    values: NewSubscription
    enabled: bool = True


# --- validation (pure) ----------------------------------------------------------------------------


def _b64url_length(value: str) -> int | None:
    """How many bytes a base64url string decodes to, or None if it is not base64url."""
    if not _BASE64URL.fullmatch(value):
        return None
    bare = value.rstrip("=")
    try:
        return len(base64.urlsafe_b64decode(bare + "=" * (-len(bare) % 4)))
    except (binascii.Error, ValueError):
        return None


def normalize_token(
    type_: SubscriptionType, token: str, field: str, violations: FieldViolations
) -> str | None:
    """The canonical form of a token of ``type_``; None (and a violation) if it is refused.

    Args:
        type_: The subscription type the token is for.
        token: The token as sent.
        field: Its path in the request.
        violations: Where a problem is recorded.
    """

    def refuse(description: str) -> None:
        violations.add(field, description, reason="INVALID_TOKEN")

    if not token:
        violations.add(field, "required", reason="REQUIRED")
        return None
    if len(token) > MAX_TOKEN_LENGTH:
        refuse(f"must be at most {MAX_TOKEN_LENGTH} characters")
        return None
    if is_placeholder_id(token):
        refuse(f"{token.strip()!r} is a placeholder, not a token")
        return None
    match type_:
        case SubscriptionType.IOS_PUSH:
            # APNs device tokens are binary (32 bytes today, up to 100 announced), sent as hex.
            if not _HEX.fullmatch(token) or len(token) % 2 or not 64 <= len(token) <= 200:
                refuse("an APNs device token is 64 to 200 hexadecimal characters")
                return None
            return token.lower()
        case SubscriptionType.ANDROID_PUSH:
            if not _FCM_TOKEN.fullmatch(token) or len(token) < 20:
                refuse(
                    "an FCM registration token is at least 20 characters of letters, digits "
                    "and '_:.-'"
                )
                return None
            return token
        case SubscriptionType.WEB_PUSH:
            return _normalize_endpoint(token, field, violations)
        case SubscriptionType.EMAIL:
            address = check_email(token, field, violations)
            # One address, one subscription: mailbox names are case-insensitive in practice.
            return None if address is None else address.lower()
        case SubscriptionType.SMS | SubscriptionType.WHATSAPP:
            return check_phone(token, field, violations)
        case SubscriptionType.TELEGRAM:
            if not _CHAT_ID.fullmatch(token) or abs(int(token)) > _INT64_MAX:
                refuse("a Telegram chat id is a non-zero 64-bit integer, e.g. 123456789")
                return None
            return token
    return None  # pragma: no cover - every type is matched above


def _normalize_endpoint(url: str, field: str, violations: FieldViolations) -> str | None:
    if len(url) > MAX_ENDPOINT_LENGTH:
        violations.add(
            field, f"must be at most {MAX_ENDPOINT_LENGTH} characters", reason="INVALID_TOKEN"
        )
        return None
    try:
        parts = urlsplit(url)
        valid = (
            parts.scheme == "https"
            and bool(parts.hostname)
            and parts.username is None
            and not any(char.isspace() for char in url)
        )
    except ValueError:
        valid = False
    if not valid:
        violations.add(
            field,
            "a web push token is the push service's https endpoint URL",
            reason="INVALID_TOKEN",
        )
        return None
    return url


def check_web_push_keys(keys: WebPushKeys | None, field: str, violations: FieldViolations) -> None:
    """Record violations unless ``keys`` are a P-256 public key and a 16-byte auth secret.

    Args:
        keys: The keys; None records ``field`` as required.
        field: Path of the keys in the request.
        violations: Where problems are recorded.
    """
    if keys is None:
        violations.add(field, "required for web_push", reason="REQUIRED")
        return
    # RFC 8291: p256dh is an uncompressed P-256 point (65 bytes), auth a 16-byte secret.
    if _b64url_length(keys.p256dh) != 65 or not keys.p256dh.startswith("B"):
        violations.add(
            f"{field}.p256dh",
            "must be the base64url uncompressed P-256 public key (65 bytes)",
            reason="INVALID_KEY",
        )
    if _b64url_length(keys.auth) != 16:
        violations.add(
            f"{field}.auth", "must be the base64url 16-byte auth secret", reason="INVALID_KEY"
        )


def _check_device(device: DeviceInfo, field: str, violations: FieldViolations) -> None:
    for name in ("model", "os", "app_version", "sdk"):
        check_text(
            getattr(device, name),
            f"{field}.{name}",
            violations,
            max_length=MAX_DEVICE_FIELD_LENGTH,
        )


def validate_new(new: NewSubscription, field: str, violations: FieldViolations) -> NewSubscription:
    """Check a registration and return it normalised; problems go to ``violations``.

    Args:
        new: The registration as sent.
        field: Path of the subscription in the request (``subscription``).
        violations: Where problems are recorded (the caller raises).

    Returns:
        ``new`` with its token in canonical form; meaningful only when no violation was
        recorded.
    """
    token: str | None = new.token
    if new.type is None:
        violations.add(f"{field}.type", "required", reason="REQUIRED")
    else:
        token = normalize_token(new.type, new.token, f"{field}.token", violations)
    if new.type is SubscriptionType.WEB_PUSH:
        check_web_push_keys(new.web_push_keys, f"{field}.web_push_keys", violations)
    elif new.web_push_keys is not None:
        violations.add(f"{field}.web_push_keys", "only for web_push", reason="NOT_APPLICABLE")
    check_text(
        new.opt_in_reason, f"{field}.opt_in_reason", violations, max_length=MAX_REASON_LENGTH
    )
    if new.device is not None:
        _check_device(new.device, f"{field}.device", violations)
    return dataclasses.replace(new, token=token or new.token)


def check_subscription_id(value: str, field: str, violations: FieldViolations) -> uuid.UUID | None:
    """A subscription id from a request; None (and a violation of ``field``) if malformed."""
    if not value:
        violations.add(field, "required", reason="REQUIRED")
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        violations.add(field, "not a subscription id (a UUID)", reason="INVALID_ID")
        return None


def parse_subscription_id(value: str, field: str = "subscription_id") -> uuid.UUID:
    """A subscription id from a request.

    Raises:
        InvalidArgument: It is empty or not a UUID, naming ``field``.
    """
    violations = FieldViolations()
    parsed = check_subscription_id(value, field, violations)
    violations.raise_if_any()
    assert parsed is not None
    return parsed


# --- pure rules ----------------------------------------------------------------------------------


def choose_evictions(
    held: Sequence[Subscription],
    *,
    adding: int = 1,
    limit: int = MAX_SUBSCRIPTIONS_PER_USER,
    field: str = "user",
) -> list[Subscription]:
    """Which of a user's subscriptions to delete so that ``adding`` more fit under ``limit``.

    The least recently active push subscriptions go first (ties: the oldest).

    Args:
        held: The user's subscriptions, not counting the ones being added.
        adding: How many are being added.
        limit: The cap.
        field: The request field that named the user, for the refusal.

    Returns:
        The subscriptions to evict (empty when there is room).

    Raises:
        ResourceExhausted: ``SUBSCRIPTION_LIMIT_REACHED`` when evicting every push
            subscription would not make room.
    """
    excess = len(held) + adding - limit
    if excess <= 0:
        return []
    push = sorted(
        (s for s in held if s.type.is_push),
        key=lambda s: (s.last_active_time, s.create_time, s.subscription_id),
    )
    if len(push) < excess:
        raise ResourceExhausted(
            f"a user holds at most {limit} subscriptions and these are all addresses "
            "(only push subscriptions are evicted to make room); delete one first",
            reason="SUBSCRIPTION_LIMIT_REACHED",
            metadata={"limit": str(limit)},
            field_violations=[
                FieldViolation(field, f"this user holds {limit} subscriptions, all addresses")
            ],
        )
    return push[:excess]


def changed_fields(before: Subscription, after: Subscription) -> list[str]:
    """The caller-visible fields that differ (not the activity timestamps)."""
    names = ("user_id", "token", "web_push_keys", "enabled", "opt_in", "opt_in_reason", "device")
    return [name for name in names if getattr(before, name) != getattr(after, name)]


def subscription_fact(
    kind: IdentityChange.Kind.ValueType,
    subscription: Subscription,
    at: datetime,
    fields: Iterable[str] = (),
) -> IdentityChange:
    """The change fact about ``subscription`` (keyed by its holder)."""
    return changes.change(
        kind,
        app_id=subscription.app_id,
        user_id=subscription.user_id,
        at=at,
        changed_fields=fields,
        subscription_id=subscription.subscription_id,
        subscription_type=subscription.type.value,
        subscription_reachable=subscription.reachable,
    )


def move_facts(before: Subscription, after: Subscription, at: datetime) -> list[IdentityChange]:
    """The facts of one subscription's change (none if nothing visible changed)."""
    fields = changed_fields(before, after)
    if not fields:
        return []
    if before.user_id != after.user_id:
        return [
            subscription_fact(changes.Kind.KIND_SUBSCRIPTION_REMOVED, before, at),
            subscription_fact(changes.Kind.KIND_SUBSCRIPTION_CHANGED, after, at, fields),
        ]
    if before.enabled and not after.enabled:
        return [subscription_fact(changes.Kind.KIND_SUBSCRIPTION_DEACTIVATED, after, at, fields)]
    return [subscription_fact(changes.Kind.KIND_SUBSCRIPTION_CHANGED, after, at, fields)]


def _touched(before: Subscription, after: Subscription, at: datetime) -> Subscription:
    """``after`` with ``update_time`` set if anything visible changed."""
    return dataclasses.replace(after, update_time=at) if changed_fields(before, after) else after


def _enabled_again(subscription: Subscription) -> Subscription:
    """Lift a dead-token verdict (the token was presented again); an operator's stands."""
    if subscription.enabled or subscription.disabled_reason == DISABLED_BY_API:
        return subscription
    return dataclasses.replace(subscription, enabled=True, disabled_reason="")


def _with_opt_in(
    subscription: Subscription, opt_in: OptIn, reason: str, at: datetime
) -> Subscription:
    if opt_in is subscription.opt_in:
        return subscription
    return dataclasses.replace(
        subscription, opt_in=opt_in, opt_in_change_time=at, opt_in_reason=reason
    )


def registered(app_id: str, user_id: uuid.UUID, new: NewSubscription, at: datetime) -> Subscription:
    """A new subscription record for a validated registration."""
    assert new.type is not None, "validate_new refuses a registration without a type"
    return Subscription(
        app_id=app_id,
        subscription_id=uuid.uuid4(),
        user_id=user_id,
        type=new.type,
        token=new.token,
        web_push_keys=new.web_push_keys,
        enabled=True,
        disabled_reason="",
        opt_in=new.opt_in or OptIn.SUBSCRIBED,
        opt_in_change_time=at,
        opt_in_reason=new.opt_in_reason,
        device=new.device or DeviceInfo(),
        last_active_time=at,
        token_time=at,
        create_time=at,
        update_time=at,
    )


def reregistered(
    current: Subscription, new: NewSubscription, holder: uuid.UUID, at: datetime
) -> Subscription:
    """``current`` after its token was registered again (by ``holder``'s device)."""
    after = dataclasses.replace(current, user_id=holder, last_active_time=at, token_time=at)
    if new.device is not None:
        after = dataclasses.replace(after, device=new.device)
    if new.web_push_keys is not None:
        after = dataclasses.replace(after, web_push_keys=new.web_push_keys)
    if new.opt_in is not None:
        after = _with_opt_in(after, new.opt_in, new.opt_in_reason, at)
    return _touched(current, _enabled_again(after), at)


def patched(
    current: Subscription, patch: SubscriptionPatch, at: datetime, *, by_client: bool
) -> Subscription:
    """``current`` with a validated patch applied."""
    paths, values = patch.paths, patch.values
    after = current
    if by_client:
        # The SDK on the device called: that is activity.
        after = dataclasses.replace(after, last_active_time=at)
    if "token" in paths and values.token != current.token:
        after = _enabled_again(dataclasses.replace(after, token=values.token, token_time=at))
    if "web_push_keys" in paths:
        after = dataclasses.replace(after, web_push_keys=values.web_push_keys)
    if "device" in paths:
        after = dataclasses.replace(after, device=values.device or DeviceInfo())
    else:
        device = values.device or DeviceInfo()
        for name in ("model", "os", "app_version", "sdk"):
            if f"device.{name}" in paths:
                after = dataclasses.replace(
                    after, device=dataclasses.replace(after.device, **{name: getattr(device, name)})
                )
    if "opt_in" in paths and values.opt_in is not None:
        # A change of consent says why only if the mask includes the reason; otherwise the old
        # reason, which explained the old state, is cleared.
        reason = values.opt_in_reason if "opt_in_reason" in paths else ""
        after = _with_opt_in(after, values.opt_in, reason, at)
    if "opt_in_reason" in paths:
        after = dataclasses.replace(after, opt_in_reason=values.opt_in_reason)
    if "enabled" in paths and patch.enabled != current.enabled:
        after = dataclasses.replace(
            after,
            enabled=patch.enabled,
            disabled_reason="" if patch.enabled else DISABLED_BY_API,
        )
    return _touched(current, after, at)


def _validate_patch(
    current: Subscription, patch: SubscriptionPatch, *, by_client: bool
) -> SubscriptionPatch:
    """Check a patch against the subscription it applies to; returns it normalised.

    Raises:
        InvalidArgument: A bad mask or value, naming each field.
        PermissionDenied: A client key asked to change a server-only field.
    """
    paths = patch.paths
    # Who may change what is answered before whether the request is well-formed (AIP-211).
    server_only = paths & (UPDATE_PATHS - CLIENT_UPDATE_PATHS)
    if by_client and server_only:
        raise PermissionDenied(
            f"a client key may change only {sorted(CLIENT_UPDATE_PATHS)}",
            reason="FIELD_REQUIRES_SERVER_KEY",
            metadata={"fields": ",".join(sorted(server_only))},
        )
    violations = FieldViolations()
    if not paths:
        violations.add("update_mask", "required: name the fields to change", reason="REQUIRED")
    unknown = sorted(paths - UPDATE_PATHS)
    if unknown:
        violations.add(
            "update_mask",
            f"unknown or read-only fields {unknown}; allowed: {sorted(UPDATE_PATHS)}",
            reason="INVALID_UPDATE_MASK",
        )
    values = patch.values
    token: str | None = values.token
    if "token" in paths:
        token = normalize_token(current.type, values.token, "subscription.token", violations)
        if current.type is SubscriptionType.WEB_PUSH and "web_push_keys" not in paths:
            # A new endpoint comes with new keys; the old keys would not decrypt.
            violations.add(
                "update_mask",
                "a web push token changes together with web_push_keys",
                reason="WEB_PUSH_KEYS_REQUIRED",
            )
    if "web_push_keys" in paths:
        if current.type is SubscriptionType.WEB_PUSH:
            check_web_push_keys(values.web_push_keys, "subscription.web_push_keys", violations)
        else:
            violations.add(
                "subscription.web_push_keys", "only for web_push", reason="NOT_APPLICABLE"
            )
    if "opt_in" in paths and values.opt_in is None:
        violations.add("subscription.opt_in", "required when in the update mask", reason="REQUIRED")
    check_text(
        values.opt_in_reason,
        "subscription.opt_in_reason",
        violations,
        max_length=MAX_REASON_LENGTH,
    )
    if values.device is not None:
        _check_device(values.device, "subscription.device", violations)
    violations.raise_if_any()
    return dataclasses.replace(patch, values=dataclasses.replace(values, token=token or ""))


# --- transactions -----------------------------------------------------------------------------


class Retry(Exception):
    """What a transaction read before taking its locks changed meanwhile: start over."""


async def retrying_transaction(
    pool: asyncpg.Pool, work: Callable[[DBConnection], Awaitable[_T]]
) -> _T:
    """Run ``work`` in a transaction, starting over when it raises :class:`Retry` (or deadlocks).

    Raises:
        Aborted: ``CONCURRENT_MODIFICATION`` if it had to start over too often.
    """
    for _ in range(_ATTEMPTS):
        try:
            async with pool.acquire() as conn, conn.transaction():
                return await work(conn)
        except (Retry, asyncpg.DeadlockDetectedError):
            continue
    raise Aborted(
        "the subscription kept changing concurrently; retry the request",
        reason="CONCURRENT_MODIFICATION",
    )


def subscription_not_found(subscription_id: uuid.UUID) -> NotFound:
    """The NOT_FOUND error for a subscription the caller's app does not have."""
    return NotFound(
        f"subscription {str(subscription_id)!r} not found",
        reason="SUBSCRIPTION_NOT_FOUND",
        metadata={"subscription_id": str(subscription_id)},
    )


def _user_not_found(user_id: uuid.UUID) -> NotFound:
    return NotFound(
        f"user {str(user_id)!r} not found",
        reason="USER_NOT_FOUND",
        metadata={"user_id": str(user_id)},
    )


async def make_room(
    conn: DBConnection,
    app_id: str,
    user_id: uuid.UUID,
    at: datetime,
    *,
    adding: int = 1,
    exclude: Collection[uuid.UUID] = (),
) -> list[IdentityChange]:
    """Evict what must go so ``adding`` more subscriptions fit under the cap of a locked user.

    Args:
        conn: A connection in the transaction that holds the user's lock.
        app_id: The app.
        user_id: The user receiving subscriptions.
        at: Now.
        adding: How many are being added.
        exclude: Subscriptions not to count (the one being moved, if the user holds it).

    Returns:
        The ``SUBSCRIPTION_REMOVED`` facts of the evicted subscriptions.

    Raises:
        ResourceExhausted: ``SUBSCRIPTION_LIMIT_REACHED`` (see :func:`choose_evictions`).
    """
    held = (await store.fetch_for_users(conn, app_id, [user_id]))[user_id]
    evict = choose_evictions([s for s in held if s.subscription_id not in exclude], adding=adding)
    removed = await store.delete(conn, app_id, [s.subscription_id for s in evict])
    return [subscription_fact(changes.Kind.KIND_SUBSCRIPTION_REMOVED, s, at) for s in removed]


async def _locked(
    conn: DBConnection, app_id: str, subscription_id: uuid.UUID, also: Sequence[uuid.UUID] = ()
) -> tuple[Subscription, dict[uuid.UUID, users_store.Profile]]:
    """The subscription, locked after its holder and ``also`` (the protocol's order).

    Returns:
        The subscription and the locked users' rows by id; a user of ``also`` missing from it
        does not exist.

    Raises:
        NotFound: There is no such subscription.
        Retry: It changed holder before the locks were taken.
    """
    seen = await store.get(conn, app_id, subscription_id)
    if seen is None:
        raise subscription_not_found(subscription_id)
    users = await users_store.lock_profiles(conn, app_id, [seen.user_id, *also])
    current = await store.get(conn, app_id, subscription_id, for_update=True)
    if current is None:
        raise subscription_not_found(subscription_id)
    if current.user_id != seen.user_id or seen.user_id not in users:
        raise Retry
    return current, users


async def _resolve(conn: DBConnection, app_id: str, user: refs.RefKey) -> uuid.UUID:
    found = (await refs.lookup(conn, app_id, [user])).get(user)
    if found is None:
        raise refs.user_not_found(user)
    return found


async def _new_anonymous_user(
    conn: DBConnection, app_id: str, at: datetime, facts: list[IdentityChange]
) -> uuid.UUID:
    [user_id] = await users_store.insert_anonymous_users(conn, app_id, 1, at)
    facts.append(
        changes.change(changes.Kind.KIND_USER_CREATED, app_id=app_id, user_id=user_id, at=at)
    )
    return user_id


async def _move(
    conn: DBConnection,
    current: Subscription,
    holder: uuid.UUID,
    at: datetime,
    facts: list[IdentityChange],
) -> Subscription:
    """Hand a locked subscription to a locked ``holder``, evicting to make room."""
    facts += await make_room(conn, current.app_id, holder, at, exclude={current.subscription_id})
    after = _touched(current, dataclasses.replace(current, user_id=holder), at)
    saved = await store.save(conn, after)
    assert saved is not None  # the token did not change
    facts += move_facts(current, saved, at)
    return saved


# --- operations ------------------------------------------------------------------------------


def check_may_choose_user(caller: AppCaller) -> None:
    """Refuse a client key that names the user of a subscription (Notificare's rule).

    Raises:
        PermissionDenied: ``USER_REQUIRES_SERVER_KEY`` for a client key.
    """
    if caller.is_client:
        raise PermissionDenied(
            "a client key cannot choose the user of a subscription: register it without "
            "`user`, then log it in (or assign it with a server key)",
            reason="USER_REQUIRES_SERVER_KEY",
        )


def check_request_id(value: str, field: str, violations: FieldViolations) -> uuid.UUID | None:
    """An optional AIP-155 request id: None when empty; a UUID, or a violation of ``field``.

    A UUID, not any string: a replay answers with a subscription id, so the key must be as
    unguessable as one.
    """
    if not value:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        violations.add(field, "not a UUID", reason="INVALID_ID")
        return None


def _fingerprint(new: NewSubscription, user: refs.RefKey | None) -> str:
    # What a retry must ask again for its request_id to count as the same request.
    assert new.type is not None
    parts = [new.type.value, new.token, repr(user)]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


async def _replayed(
    conn: DBConnection, app_id: str, request_id: uuid.UUID, fingerprint: str, at: datetime
) -> Subscription | None:
    """The subscription a live earlier request with this id registered, if there was one.

    Raises:
        InvalidArgument: ``REQUEST_ID_REUSED``: the id was used for another registration.
    """
    earlier = await store.find_request(conn, app_id, request_id, since=at - REQUEST_ID_TTL)
    if earlier is None:
        return None
    if earlier.fingerprint != fingerprint:
        raise InvalidArgument(
            "this request_id was used for another registration; use a new UUID per "
            "registration and the same one only to retry it",
            reason="REQUEST_ID_REUSED",
            field_violations=[FieldViolation("request_id", "used for another registration")],
        )
    return await store.get(conn, app_id, earlier.subscription_id)


async def create_subscription(
    pool: asyncpg.Pool,
    caller: AppCaller,
    new: NewSubscription,
    user: refs.RefKey | None,
    at: datetime,
    *,
    request_id: str = "",
) -> Subscription:
    """Register a device or address (see the module doc for every rule).

    Args:
        pool: The identity database.
        caller: Who calls.
        new: The registration, as sent.
        user: Server keys only: the user to hold it; None for a fresh anonymous profile (or,
            for a token already registered, to leave it with its holder).
        at: Now.
        request_id: Optional idempotency key (a UUID): a retry with it within
            :data:`REQUEST_ID_TTL` answers with the subscription the first call registered.

    Returns:
        The new subscription, or the existing one of that (type, token), refreshed.

    Raises:
        PermissionDenied: A client key named a user.
        InvalidArgument: A bad field; ``REQUEST_ID_REUSED`` for a request_id of another
            registration.
        NotFound: ``user`` names nobody.
        AlreadyExists: A client key registered an address that is already registered.
        ResourceExhausted: The user's subscriptions are all addresses and at the cap.
    """
    if user is not None:
        check_may_choose_user(caller)
    violations = FieldViolations()
    new = validate_new(new, "subscription", violations)
    request_key = check_request_id(request_id, "request_id", violations)
    violations.raise_if_any()
    app_id = caller.app_id
    type_ = new.type
    assert type_ is not None
    fingerprint = _fingerprint(new, user)

    async def remember(subscription: Subscription, conn: DBConnection) -> Subscription:
        if request_key is None:
            return subscription
        key = store.RequestKey(subscription.subscription_id, fingerprint)
        if not await store.remember_request(
            conn, app_id, request_key, key, at=at, expired_before=at - REQUEST_ID_TTL
        ):
            raise Retry  # a twin of this request committed first: answer as it did
        return subscription

    async def work(conn: DBConnection) -> Subscription:
        if request_key is not None:
            replayed = await _replayed(conn, app_id, request_key, fingerprint, at)
            if replayed is not None:
                return replayed
        facts: list[IdentityChange] = []
        target = None if user is None else await _resolve(conn, app_id, user)
        existing = await store.find_by_token(conn, app_id, type_, new.token)
        if existing is None:
            if target is None:
                holder = await _new_anonymous_user(conn, app_id, at, facts)
            else:
                if await users_store.lock_user(conn, app_id, target) is None:
                    raise _user_not_found(target)
                facts += await make_room(conn, app_id, target, at)
                holder = target
            created = await store.insert(conn, registered(app_id, holder, new, at))
            if created is None:
                raise Retry  # registered concurrently: start over and find it
            facts.append(subscription_fact(changes.Kind.KIND_SUBSCRIPTION_CREATED, created, at))
            await changes.publish(conn, facts)
            return await remember(created, conn)
        if request_key is not None:
            # A twin may have committed between the first look and finding its row (they
            # commit together): answer as it did rather than as to a second registration.
            replayed = await _replayed(conn, app_id, request_key, fingerprint, at)
            if replayed is not None:
                return replayed
        if caller.is_client and not existing.type.is_push:
            raise AlreadyExists(
                f"this {type_.value} address is already registered",
                reason="SUBSCRIPTION_ALREADY_EXISTS",
                field_violations=[FieldViolation("subscription.token", "already registered")],
            )
        try:
            current, users = await _locked(
                conn, app_id, existing.subscription_id, [] if target is None else [target]
            )
        except NotFound:
            raise Retry from None  # deleted meanwhile: the token is free to register anew
        if (current.type, current.token) != (existing.type, existing.token):
            raise Retry  # its token changed meanwhile: this one is free to register anew
        holder = current.user_id if target is None else target
        if holder not in users:
            raise _user_not_found(holder)
        if holder != current.user_id:
            facts += await make_room(conn, app_id, holder, at, exclude={current.subscription_id})
        after = reregistered(current, new, holder, at)
        saved = await store.save(conn, after)
        assert saved is not None  # the token did not change
        facts += move_facts(current, saved, at)
        await changes.publish(conn, facts)
        return await remember(saved, conn)

    return await retrying_transaction(pool, work)


async def get_subscription(
    pool: asyncpg.Pool, caller: AppCaller, subscription_id: uuid.UUID
) -> Subscription:
    """One subscription of the caller's app.

    Raises:
        NotFound: No such subscription in the caller's app.
    """
    async with pool.acquire() as conn:
        found = await store.get(conn, caller.app_id, subscription_id)
    if found is None:
        raise subscription_not_found(subscription_id)
    return found


async def update_subscription(
    pool: asyncpg.Pool,
    caller: AppCaller,
    subscription_id: uuid.UUID,
    patch: SubscriptionPatch,
    at: datetime,
) -> Subscription:
    """Change a subscription's opt-in, device, keys, token or (server keys) enabled flag.

    A client key names the subscription by the id it got when registering: holding the id is
    the proof. A client's call also counts as activity (``last_active_time``). Setting a token
    another subscription has is refused (register it instead, which moves it). Changing the
    token lifts a dead-token verdict; ``enabled=false`` by a server key stays until a server key
    sets it back.

    Raises:
        NotFound: No such subscription in the caller's app.
        InvalidArgument: A bad mask or value.
        PermissionDenied: A client key tried to change ``enabled``.
        AlreadyExists: ``SUBSCRIPTION_TOKEN_TAKEN``: the new token belongs to another.
    """

    async def work(conn: DBConnection) -> Subscription:
        current = await store.get(conn, caller.app_id, subscription_id, for_update=True)
        if current is None:
            raise subscription_not_found(subscription_id)
        valid = _validate_patch(current, patch, by_client=caller.is_client)
        after = patched(current, valid, at, by_client=caller.is_client)
        saved = await store.save(conn, after)
        if saved is None:
            raise AlreadyExists(
                f"another subscription has this {current.type.value} token; register it with "
                "CreateSubscription to move it",
                reason="SUBSCRIPTION_TOKEN_TAKEN",
                field_violations=[
                    FieldViolation("subscription.token", "held by another subscription")
                ],
            )
        if saved.token != current.token:
            await _token_replaced(conn, current, saved)
        await changes.publish(conn, move_facts(current, saved, at))
        return saved

    return await retrying_transaction(pool, work)


async def _token_replaced(conn: DBConnection, before: Subscription, after: Subscription) -> None:
    """A changed token leaves the old one without a row, as a deletion would: an opted-out old
    token is suppressed; the new one's suppression is consumed (the row carries its consent)."""
    await suppressions.record(conn, before.app_id, store.opted_out([before]))
    await suppressions.forget(conn, after.app_id, after.type.value, after.token)


async def delete_subscription(
    pool: asyncpg.Pool, caller: AppCaller, subscription_id: uuid.UUID, at: datetime
) -> None:
    """Delete a subscription (its holder stays, even an anonymous one: it may have events).

    Raises:
        NotFound: No such subscription in the caller's app.
    """
    async with pool.acquire() as conn, conn.transaction():
        removed = await store.delete(conn, caller.app_id, [subscription_id])
        if not removed:
            raise subscription_not_found(subscription_id)
        await changes.publish(
            conn,
            [subscription_fact(changes.Kind.KIND_SUBSCRIPTION_REMOVED, s, at) for s in removed],
        )


async def assign_subscription(
    pool: asyncpg.Pool,
    caller: AppCaller,
    subscription_id: uuid.UUID,
    user: refs.RefKey,
    at: datetime,
) -> Subscription:
    """Move a subscription to a user (server keys), evicting to make room under the cap.

    Raises:
        NotFound: No such subscription, or ``user`` names nobody.
        ResourceExhausted: The user's subscriptions are all addresses and at the cap.
    """

    async def work(conn: DBConnection) -> Subscription:
        target = await _resolve(conn, caller.app_id, user)
        current, users = await _locked(conn, caller.app_id, subscription_id, [target])
        if target not in users:
            raise _user_not_found(target)
        if target == current.user_id:
            return current
        facts: list[IdentityChange] = []
        moved = await _move(conn, current, target, at, facts)
        await changes.publish(conn, facts)
        return moved

    return await retrying_transaction(pool, work)


async def unassign_subscription(
    pool: asyncpg.Pool, caller: AppCaller, subscription_id: uuid.UUID, at: datetime
) -> Subscription:
    """Move a subscription from its user to a fresh anonymous profile (Logout does the same).

    Idempotent: a subscription already held by an anonymous profile (no external id) stays
    where it is, so
    repeating a logout does not pile up empty profiles.

    Raises:
        NotFound: No such subscription in the caller's app.
    """

    async def work(conn: DBConnection) -> Subscription:
        current, users = await _locked(conn, caller.app_id, subscription_id)
        if users[current.user_id].external_id is None:
            return current
        facts: list[IdentityChange] = []
        anonymous = await _new_anonymous_user(conn, caller.app_id, at, facts)
        moved = await _move(conn, current, anonymous, at, facts)
        await changes.publish(conn, facts)
        return moved

    return await retrying_transaction(pool, work)
