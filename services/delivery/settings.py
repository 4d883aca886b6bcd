"""Settings of the delivery service: the shared settings with delivery's native-stack defaults."""

from __future__ import annotations

from pydantic import Field

from services.runtime.settings import ServiceSettings, default_database_url

#: The development key for credentials at rest; a deployment sets its own.
DEV_SECRET_KEY = "tidings-dev-delivery-secret-key-change-me"


class DeliverySettings(ServiceSettings):
    """Delivery service settings; every field can be overridden by ``TIDINGS_<FIELD>``."""

    service_name: str = "delivery"
    grpc_port: int = 50053
    metrics_port: int = 9103
    database_url: str = default_database_url("tidings_delivery")
    #: identity's gRPC address: API keys, profiles, segments, opt-outs.
    identity_target: str = "127.0.0.1:50051"
    #: Key material for credentials and identity keys at rest (AES-256-GCM, key = SHA-256 of
    #: it) and for signing tracking links. Changing it makes stored credentials unreadable.
    delivery_secret_key: str = Field(default=DEV_SECRET_KEY, repr=False)
    #: How long a key identity vouched for is trusted (revocation takes effect within it).
    auth_cache_seconds: float = 1.0
    #: Whether this process consumes delivery.requests (a worker of the consumer group).
    run_worker: bool = True
    #: Whether this process puts due deferred and retried messages back on delivery.requests.
    run_scheduler: bool = True
    #: Whether this process runs broadcast fan-outs (all users, segments, lists).
    run_fanout: bool = True
    #: Records per worker batch (one identity BatchGetUsers per app and batch).
    worker_batch: int = 2000
    #: Provider calls in flight per worker.
    send_concurrency: int = 256
    #: SMTP transactions at once per worker (relays refuse bursts of sessions with 421).
    smtp_max_connections: int = Field(default=10, ge=1)
    #: Provider calls per message before it is dead-lettered.
    max_attempts: int = 5
    #: First retry delay in seconds; doubles per attempt (with full jitter), capped below.
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 900.0
    #: A send claimed longer ago than this lost its worker mid-call: FAILED, OUTCOME_UNKNOWN.
    stuck_after_seconds: float = 300.0
    #: How often the scheduler looks for due messages.
    scheduler_interval_seconds: float = 1.0
    #: The click/open/unsubscribe HTTP endpoint.
    tracking_host: str = "0.0.0.0"
    tracking_port: int = 8080
    #: The public base URL of that endpoint, used in rewritten links and the open pixel.
    tracking_base_url: str = "http://127.0.0.1:8080"
