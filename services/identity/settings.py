"""Settings of the identity service: the shared settings with identity's native-stack defaults."""

from __future__ import annotations

from services.runtime.settings import ServiceSettings, default_database_url


class IdentitySettings(ServiceSettings):
    """Identity service settings; every field can be overridden by ``TIDINGS_<FIELD>``."""

    service_name: str = "identity"
    grpc_port: int = 50051
    metrics_port: int = 9101
    database_url: str = default_database_url("tidings_identity")
