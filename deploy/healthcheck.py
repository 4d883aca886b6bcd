"""Container health check of a Tidings service: asks its gRPC health service whether it serves.

Run inside a service's container (``python /app/deploy/healthcheck.py``): it checks the overall
server status (service name ``""``) on ``localhost:$TIDINGS_GRPC_PORT`` and exits 0 only when the
answer is SERVING. A service reports SERVING once migrations, its pool and Kafka are ready, and
drops to NOT_SERVING while Postgres or Kafka is unreachable, so this is a readiness check. It
uses the grpcio-health-checking package the services already depend on, so the image needs no
grpc_health_probe binary.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 3.0


def main() -> int:
    """Checks the local service once.

    Returns:
        0 if it is SERVING, 1 otherwise (unreachable, NOT_SERVING, or no answer in time).
    """
    port = os.environ.get("TIDINGS_GRPC_PORT", "50051")
    with grpc.insecure_channel(f"localhost:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S
            )
        except grpc.RpcError as error:
            print(f"unhealthy: {error.code().name}", file=sys.stderr)
            return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        print(f"unhealthy: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
