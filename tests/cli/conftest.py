"""The CLI tests talk to the same kind of identity process as the identity tests."""

from tests.identity.conftest import (
    app,
    apps_stub,
    identity_channel,
    identity_database,
    identity_process,
    identity_stub,
)

__all__ = [
    "app",
    "apps_stub",
    "identity_channel",
    "identity_database",
    "identity_process",
    "identity_stub",
]
