"""Secrets at rest: AES-256-GCM under a key derived from a service's secret setting.

Each value is ``nonce (12 bytes) || ciphertext || tag``, sealed with associated data naming where
it belongs (``app_id/channel``, ``identity/app_id``), so a ciphertext copied to another row does
not open. The same key material signs short tokens (HMAC-SHA256 under a separately derived key).
Keys are derived per ``domain`` (``tidings-delivery``, ``tidings-journey``): one service's
ciphertexts never open in another even if a deployment gives both the same material.
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


class SecretBox:
    """Seals and opens secrets; signs and checks short tokens.

    Args:
        key_material: The deployment's secret (any length; hashed into the keys).
        domain: Whose secrets these are; part of the key derivation.
        setting: The setting the material comes from, named when it is empty.
    """

    def __init__(self, key_material: str, *, domain: str, setting: str = "the secret key") -> None:
        if not key_material:
            raise ValueError(f"{setting} must not be empty")
        root = key_material.encode()
        prefix = domain.encode()
        self._aead = AESGCM(hashlib.sha256(prefix + b"-aead\0" + root).digest())
        self._mac_key = hashlib.sha256(prefix + b"-mac\0" + root).digest()

    def seal(self, plaintext: bytes, context: str) -> bytes:
        """Encrypt ``plaintext`` bound to ``context``."""
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, context.encode())

    def open(self, sealed: bytes, context: str) -> bytes:
        """Decrypt what :meth:`seal` made for the same ``context``.

        Raises:
            SecretBoxError: Wrong key, wrong context, or altered bytes.
        """
        try:
            return self._aead.decrypt(
                sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], context.encode()
            )
        except (InvalidTag, ValueError) as exc:
            raise SecretBoxError("the stored secret cannot be opened with this key") from exc

    def sign(self, data: bytes) -> bytes:
        """A 16-byte MAC of ``data`` (tracking links)."""
        return hmac.new(self._mac_key, data, hashlib.sha256).digest()[:16]

    def verify(self, data: bytes, mac: bytes) -> bool:
        """Whether ``mac`` is :meth:`sign` of ``data`` (constant time)."""
        return hmac.compare_digest(self.sign(data), mac)
