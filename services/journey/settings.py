"""Settings of the journey service: the shared settings with journey's native-stack defaults."""

from __future__ import annotations

from services.runtime.settings import ServiceSettings, default_database_url


class JourneySettings(ServiceSettings):
    """Journey service settings; every field can be overridden by ``TIDINGS_<FIELD>``."""

    service_name: str = "journey"
    grpc_port: int = 50052
    metrics_port: int = 9102
    database_url: str = default_database_url("tidings_journey")
