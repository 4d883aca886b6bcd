"""The suppression list: opted-out addresses and tokens that outlive their subscription.

An opt-out lives on the subscription row (``opt_in = 'unsubscribed'``). When such a row is
deleted (DeleteSubscription, erasure, an eviction at the cap, a Login merge dropping it, an
import's eviction) or its token is changed, the (type, token) is remembered here, so an import
that creates it again creates it unsubscribed (``opt_in_reason`` :data:`REASON`): an import is
not consent. A registration through the API is (the person's own app registering the address or
device), so :func:`services.identity.subscriptions_store.insert` consumes the suppression and the
subscription is created as the caller asks (subscribed by default). Creating the subscription
consumes the row either way: from then on the subscription row carries the consent again.

Only a keyed hash is stored (what ESPs keep of an unsubscribed contact they delete): HMAC-SHA256
of ``app, type, token`` (the normalised token, as stored) under the MAC key of identity's
:class:`~services.runtime.secrets_box.SecretBox` (``TIDINGS_IDENTITY_SECRET_KEY``), truncated to
16 bytes like :meth:`SecretBox.sign`. So an erased person's address is not kept in clear, and a
database dump cannot be reversed by hashing a list of addresses without the key. The app is in
the hash, so one address in two apps gives two unrelated hashes.

Key rotation (``new,old``): a suppression matches under any listed key and new ones are stored
under the newest. A hash cannot be re-keyed (the address is not kept), so suppressions stored
under a material stop matching once that material is dropped from the setting.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from services.identity import pii
from services.runtime.db import DBConnection

__all__ = ["REASON", "Hasher", "forget", "key_count", "record"]

#: ``opt_in_reason`` of a subscription an import created unsubscribed because it was suppressed.
REASON = "suppressed"

#: Domain separation from the other uses of the same MAC key (PII nonces, signatures).
_PREFIX = b"tidings-suppression\0"
_HASH_BYTES = 16


def _mac_keys() -> list[bytes]:
    """The suppression keys of identity's box, newest first (matching in SQL needs every
    listed key's hash up front)."""
    return pii.box().derived_keys(b"tidings-suppression")


class Hasher:
    """Hashes the tokens of one (app, type), under every listed key (newest first).

    The HMAC state of the shared prefix is computed once: an import hashes each token of a
    file with one ``copy`` and ``update`` per key.

    Args:
        app_id: The app.
        type_: The subscription type, as stored (``email``).
    """

    def __init__(self, app_id: str, type_: str) -> None:
        prefix = _PREFIX + app_id.encode() + b"\0" + type_.encode() + b"\0"
        self._bases = [hmac.new(key, prefix, hashlib.sha256) for key in _mac_keys()]

    @property
    def keys(self) -> int:
        """How many hashes :meth:`all` gives per token (the listed keys)."""
        return len(self._bases)

    def all(self, token: str) -> list[bytes]:
        """The token's hash under each listed key, newest first."""
        data = token.encode()
        hashes = []
        for base in self._bases:
            mac = base.copy()
            mac.update(data)
            hashes.append(mac.digest()[:_HASH_BYTES])
        return hashes

    def newest(self, token: str) -> bytes:
        """The token's hash under the newest key (what is stored)."""
        mac = self._bases[0].copy()
        mac.update(token.encode())
        return mac.digest()[:_HASH_BYTES]


def key_count() -> int:
    """How many hashes a token has (one per listed key)."""
    return len(_mac_keys())


async def record(conn: DBConnection, app_id: str, opted_out: Iterable[tuple[str, str]]) -> None:
    """Remember ``(type, token)`` pairs of opted-out subscriptions that are going away.

    Call in the transaction that deletes them (or changes their token). One statement.
    """
    rows = [(type_, Hasher(app_id, type_).newest(token)) for type_, token in opted_out]
    if not rows:
        return
    await conn.execute(
        """
        INSERT INTO suppressions (app_id, type, token_hash, create_time)
        SELECT $1, t.type, t.token_hash, now()
        FROM unnest($2::text[], $3::bytea[]) AS t(type, token_hash)
        ON CONFLICT DO NOTHING
        """,
        app_id,
        [type_ for type_, _ in rows],
        [token_hash for _, token_hash in rows],
    )


async def forget(conn: DBConnection, app_id: str, type_: str, token: str) -> bool:
    """Drop the suppression of ``(type, token)`` (a subscription of it exists again).

    Returns:
        Whether there was one.
    """
    status = await conn.execute(
        "DELETE FROM suppressions WHERE app_id = $1 AND type = $2 AND token_hash = ANY($3)",
        app_id,
        type_,
        Hasher(app_id, type_).all(token),
    )
    return not status.endswith(" 0")
