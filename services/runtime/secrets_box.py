"""Secrets at rest: AES-256-GCM under a key derived from a service's secret setting.

Each value is ``nonce (12 bytes) || ciphertext || tag``, sealed with associated data naming where
it belongs (``app_id/channel``, ``identity/app_id``), so a ciphertext copied to another row does
not open. The same key material signs short tokens (HMAC-SHA256 under a separately derived key).
Keys are derived per ``domain`` (``tidings-delivery``, ``tidings-journey``): one service's
ciphertexts never open in another even if a deployment gives both the same material.

Rotation: the setting holds comma-separated materials, newest first (``new,old``). New values
are sealed and signed with the newest; every listed one still opens and verifies, and
:meth:`SecretBox.reseal` re-encrypts a value sealed with an older one, so services move their
stored secrets to the newest key and the old one can then be dropped from the setting.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["SecretBox", "SecretBoxError"]

_NONCE_BYTES = 12


class SecretBoxError(Exception):
    """A stored secret could not be opened (another key, or tampered with)."""


class _Key:
    """The AEAD and MAC keys derived from one material."""

    def __init__(self, material: str, domain: str) -> None:
        root = material.encode()
        prefix = domain.encode()
        self.aead = AESGCM(hashlib.sha256(prefix + b"-aead\0" + root).digest())
        self.mac_key = hashlib.sha256(prefix + b"-mac\0" + root).digest()

    def open(self, sealed: bytes, context: str) -> bytes | None:
        try:
            return self.aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], context.encode())
        except (InvalidTag, ValueError):
            return None

    def sign(self, data: bytes) -> bytes:
        return hmac.new(self.mac_key, data, hashlib.sha256).digest()[:16]


class SecretBox:
    """Seals and opens secrets; signs and checks short tokens.

    Args:
        key_material: The deployment's secret (any length; hashed into the keys), or several
            separated by commas, newest first, while rotating.
        domain: Whose secrets these are; part of the key derivation.
        setting: The setting the material comes from, named when it is empty.
    """

    def __init__(self, key_material: str, *, domain: str, setting: str = "the secret key") -> None:
        materials = [material.strip() for material in key_material.split(",")]
        if not all(materials):
            raise ValueError(f"{setting} must not be empty (nor hold an empty key)")
        self._keys = [_Key(material, domain) for material in materials]
        self._newest = self._keys[0]

    def seal(self, plaintext: bytes, context: str) -> bytes:
        """Encrypt ``plaintext`` bound to ``context``, with the newest key."""
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._newest.aead.encrypt(nonce, plaintext, context.encode())

    def open(self, sealed: bytes, context: str) -> bytes:
        """Decrypt what :meth:`seal` made for the same ``context`` with any listed key.

        Raises:
            SecretBoxError: No listed key opens it, wrong context, or altered bytes.
        """
        for key in self._keys:
            plaintext = key.open(sealed, context)
            if plaintext is not None:
                return plaintext
        raise SecretBoxError("the stored secret cannot be opened with this key")

    def reseal(self, sealed: bytes, context: str) -> bytes | None:
        """``sealed`` re-encrypted with the newest key, or None if it already is.

        Raises:
            SecretBoxError: No listed key opens it.
        """
        if self._newest.open(sealed, context) is not None:
            return None
        return self.seal(self.open(sealed, context), context)

    def derived_keys(self, purpose: bytes) -> list[bytes]:
        """A key for ``purpose`` from each listed key, newest first: for hashes looked up by
        value (several keys while rotating), without handing out the MAC keys themselves."""
        return [
            hmac.new(key.mac_key, b"derive\0" + purpose, hashlib.sha256).digest()
            for key in self._keys
        ]

    def sign(self, data: bytes) -> bytes:
        """A 16-byte MAC of ``data`` (tracking links), with the newest key."""
        return self._newest.sign(data)

    def verify(self, data: bytes, mac: bytes) -> bool:
        """Whether ``mac`` is :meth:`sign` of ``data`` under any listed key (constant time)."""
        matches = [hmac.compare_digest(key.sign(data), mac) for key in self._keys]
        return any(matches)
