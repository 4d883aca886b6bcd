"""Settings of the journey service: the shared settings with journey's native-stack defaults."""

from __future__ import annotations

from pydantic import Field

from services.runtime.settings import ServiceSettings, default_database_url

#: The development key for secrets at rest; a deployment sets its own.
DEV_SECRET_KEY = "tidings-dev-journey-secret-key-change-me"


class JourneySettings(ServiceSettings):
    """Journey service settings; every field can be overridden by ``TIDINGS_<FIELD>``."""

    service_name: str = "journey"
    grpc_port: int = 50052
    metrics_port: int = 9102
    database_url: str = default_database_url("tidings_journey")
    db_pool_max: int = 12

    #: Where identity and delivery answer gRPC.
    identity_target: str = "127.0.0.1:50051"
    delivery_target: str = "127.0.0.1:50053"

    #: Simulated clock: the engine's "now" is the real time plus this many seconds (may be
    #: negative). For demos and tests of day-long delays and birthdays; 0 in production.
    clock_offset_seconds: float = 0.0

    #: Whether this process runs the engine (claim loop, audience loader, consumers).
    run_engine: bool = True
    #: Most customers stepped in one claim transaction.
    engine_batch: int = 1000
    #: Claim loops per process (each its own connection; SKIP LOCKED shares the work).
    engine_workers: int = 2
    #: How long an idle claim loop sleeps before looking again (seconds); new work wakes it
    #: at once through NOTIFY.
    engine_idle_wait: float = 0.2

    #: Key material sealing the per-app identity keys journey holds (AES-256-GCM, key derived
    #: from it). Changing it only costs a new key per app (minted with the admin key).
    journey_secret_key: str = Field(default=DEV_SECRET_KEY, repr=False)

    #: Webhook nodes may call loopback and private addresses (tests and local demos only).
    webhook_allow_private: bool = False
