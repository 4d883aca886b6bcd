"""Name-based (UUIDv5) ids as text, made without UUID objects: fan-out and receipts make one
per message, and ``uuid.uuid5`` + ``str()`` show in their profiles."""

from __future__ import annotations

import hashlib
import uuid

__all__ = ["uuid5_text"]


def uuid5_text(namespace: uuid.UUID, name: str) -> str:
    """``str(uuid.uuid5(namespace, name))``."""
    digest = bytearray(hashlib.sha1(namespace.bytes + name.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    text = digest.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
