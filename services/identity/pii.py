"""Custom attribute values of PII customer fields, sealed at rest.

A value of a field marked ``pii`` is stored in ``users.attributes`` as ``{"$pii": "<base64>"}``
instead of the plain JSON scalar: the runtime's :class:`SecretBox` (domain
``tidings-identity``, key material ``TIDINGS_IDENTITY_SECRET_KEY``) seals the value's JSON text
(``"Ada"``, ``42.0``, ``true``: the type travels inside) bound to ``app/user/field``, so a
ciphertext copied to another user, field or app does not open. Plain values are never JSON
objects, so every stored value says what it is: readers open what is sealed and take the rest
as it is, which is what makes a flip of the ``pii`` flag safe to interrupt.

Sealing is deterministic per ``(key, app, user, field, value)`` (the nonce is a keyed hash of
them): writing the same value again stores the same bytes, so the set-based import still tells
unchanged rows from updated ones. That shows only whether one user's field went back to an
earlier value, never equal values across users or fields (the context is in the nonce).

Reading and writing go through the process's box (:func:`configure` at start-up; the dev key
otherwise, as in tests that call the store directly).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import uuid
from collections.abc import Mapping
from typing import Any

from services.identity.settings import DEV_SECRET_KEY
from services.runtime.secrets_box import SecretBox, SecretBoxError

__all__ = [
    "SEALED_KEY",
    "PiiBox",
    "box",
    "configure",
    "context",
    "is_sealed",
    "open_attributes",
    "seal_attributes",
]

log = logging.getLogger(__name__)

#: The one key of a sealed value's JSON object.
SEALED_KEY = "$pii"

_NONCE_BYTES = 12


def context(app_id: str, user_id: uuid.UUID | str, name: str) -> str:
    """The associated data binding a value to its app, user and field."""
    return f"pii/{app_id}/{user_id}/{name}"


def is_sealed(value: object) -> bool:
    """Whether a stored attribute value is sealed (plain values are never objects)."""
    return isinstance(value, dict)


class PiiBox(SecretBox):
    """Identity's box: seals attribute values deterministically (see the module doc).

    Args:
        key_material: ``TIDINGS_IDENTITY_SECRET_KEY``: one material, or ``new,old``.
    """

    def __init__(self, key_material: str) -> None:
        super().__init__(
            key_material, domain="tidings-identity", setting="TIDINGS_IDENTITY_SECRET_KEY"
        )
        self.rotating = "," in key_material

    def _seal(self, value: Any, where: str) -> str:
        plaintext = _json_text(value)
        where_bytes = where.encode()
        key = self._newest
        # The nonce is a keyed BLAKE2b (a PRF, several times cheaper here than HMAC-SHA256) of
        # where and what, under the key's MAC key.
        nonce = hashlib.blake2b(
            where_bytes + b"\0" + plaintext, key=key.mac_key, digest_size=_NONCE_BYTES
        ).digest()
        return base64.b64encode(nonce + key.aead.encrypt(nonce, plaintext, where_bytes)).decode()

    def seal_value(self, value: Any, where: str) -> dict[str, str]:
        """``value`` (a plain JSON scalar) sealed for ``where`` (:func:`context`), newest key."""
        return {SEALED_KEY: self._seal(value, where)}

    def seal_json(self, value: Any, where: str) -> str:
        """:meth:`seal_value` as JSON text (what an import copies into its staging table)."""
        return f'{{"{SEALED_KEY}": "{self._seal(value, where)}"}}'

    def open_value(self, stored: Mapping[str, Any], where: str) -> Any:
        """The plain scalar of a sealed value.

        Raises:
            SecretBoxError: Not a sealed value, no listed key opens it, or it was sealed for
                another app, user or field.
        """
        return json.loads(self.open(_bytes_of(stored), where))

    def reseal_value(self, stored: Mapping[str, Any], where: str) -> dict[str, str] | None:
        """``stored`` sealed with the newest key, or None if it already is.

        Raises:
            SecretBoxError: As :meth:`open_value`.
        """
        if self._newest.open(_bytes_of(stored), where) is not None:
            return None
        return self.seal_value(self.open_value(stored, where), where)


def _json_text(value: Any) -> bytes:
    """The JSON text of a plain scalar (floats and bools without json.dumps, which costs more
    than the encryption; stored numbers are finite)."""
    kind = type(value)
    if kind is float:
        return repr(value).encode()
    if kind is bool:
        return b"true" if value else b"false"
    return json.dumps(value).encode()


def _bytes_of(stored: Mapping[str, Any]) -> bytes:
    text = stored.get(SEALED_KEY) if isinstance(stored, Mapping) else None
    if not isinstance(text, str):
        raise SecretBoxError("not a sealed attribute value")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SecretBoxError("not a sealed attribute value") from None


_box: PiiBox | None = None


def configure(key_material: str) -> PiiBox:
    """Use ``key_material`` for this process's sealing and opening (at start-up)."""
    global _box
    _box = PiiBox(key_material)
    return _box


def box() -> PiiBox:
    """This process's box (the development key until :func:`configure`)."""
    return _box if _box is not None else configure(DEV_SECRET_KEY)


def seal_attributes(
    app_id: str, user_id: uuid.UUID, attributes: Mapping[str, Any], names: frozenset[str]
) -> dict[str, Any]:
    """A copy of ``attributes`` with the values of ``names`` sealed (others as they are)."""
    sealer = box()
    stored = dict(attributes)
    for name in names & stored.keys():
        value = stored[name]
        if not is_sealed(value):
            stored[name] = sealer.seal_value(value, context(app_id, user_id, name))
    return stored


def open_attributes(app_id: str, user_id: uuid.UUID, stored: dict[str, Any]) -> dict[str, Any]:
    """``stored`` with its sealed values opened.

    A value no listed key opens is left out (and logged): the rest of the profile still reads.
    """
    opener = box()
    opened = dict(stored)
    for name, value in stored.items():
        if is_sealed(value):
            try:
                opened[name] = opener.open_value(value, context(app_id, user_id, name))
            except (SecretBoxError, ValueError):
                log.error(
                    "attribute %r of a user of app %s opens with no listed key; left out",
                    name,
                    app_id,
                )
                del opened[name]
    return opened
