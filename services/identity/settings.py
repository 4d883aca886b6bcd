"""Settings of the identity service: the shared settings with identity's native-stack defaults."""

from __future__ import annotations

from pydantic import Field

from services.runtime.settings import ServiceSettings, default_database_url

#: The development key for PII attribute values at rest; a deployment sets its own.
DEV_SECRET_KEY = "tidings-dev-identity-secret-key-change-me"


class IdentitySettings(ServiceSettings):
    """Identity service settings; every field can be overridden by ``TIDINGS_<FIELD>``."""

    service_name: str = "identity"
    grpc_port: int = 50051
    metrics_port: int = 9101
    database_url: str = default_database_url("tidings_identity")
    #: Key material for custom attribute values of PII customer fields at rest (AES-256-GCM,
    #: key = SHA-256 of it). ``new,old`` rotates: values are re-sealed with ``new`` at start-up
    #: and hourly; losing every listed material makes the stored PII values unreadable.
    identity_secret_key: str = Field(default=DEV_SECRET_KEY, repr=False)
    #: Seconds between re-checks of time-relative segments ("in the last 7 days", birthdays),
    #: so users also leave them as time passes (docs/segments.md).
    segment_refresh_seconds: float = 60.0
    #: Most dirty users the segment maintainer re-evaluates per transaction.
    segment_batch_size: int = 500
    #: Seconds the segment maintainer waits for a NOTIFY before looking anyway.
    segment_poll_seconds: float = 1.0
