"""Settings of the delivery service: the shared settings with delivery's native-stack defaults."""

from __future__ import annotations

from services.runtime.settings import ServiceSettings, default_database_url


class DeliverySettings(ServiceSettings):
    """Delivery service settings; every field can be overridden by ``TIDINGS_<FIELD>``."""

    service_name: str = "delivery"
    grpc_port: int = 50053
    metrics_port: int = 9103
    database_url: str = default_database_url("tidings_delivery")
