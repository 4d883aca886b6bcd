"""Service settings read from the environment (``TIDINGS_*``), defaulting to the native stack."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Native stack defaults (scripts/stack.sh); docker compose overrides them through the environment.
DEFAULT_PG_HOST = "127.0.0.1"
DEFAULT_PG_PORT = 55432
DEFAULT_KAFKA_BOOTSTRAP = "127.0.0.1:19092"


def default_database_url(database: str) -> str:
    """DSN of one service's database on the native stack."""
    return f"postgresql://tidings:tidings@{DEFAULT_PG_HOST}:{DEFAULT_PG_PORT}/{database}"


class ServiceSettings(BaseSettings):
    """Settings every service shares; each service subclasses it to set its own defaults.

    Every field is read from ``TIDINGS_<FIELD>`` (e.g. ``TIDINGS_GRPC_PORT``). In docker compose
    each service is its own container, so one set of names is enough; natively, each service's
    defaults differ (ports, database), so ``make dev`` needs no environment at all.
    """

    model_config = SettingsConfigDict(env_prefix="TIDINGS_", extra="ignore")

    service_name: str = "tidings"
    grpc_host: str = "0.0.0.0"
    grpc_port: int = 50051
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9101
    database_url: str = default_database_url("tidings")
    db_pool_min: int = 2
    db_pool_max: int = 10
    kafka_bootstrap: str = DEFAULT_KAFKA_BOOTSTRAP
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"
    #: Key that may create apps and keys; empty disables admin access.
    admin_key: str = Field(default="", repr=False)
    #: How long SIGTERM waits for in-flight RPCs before cancelling them.
    shutdown_grace_seconds: float = 10.0
    #: Whether this process runs the outbox relay (one relay per database is elected by lock).
    run_outbox_relay: bool = True
