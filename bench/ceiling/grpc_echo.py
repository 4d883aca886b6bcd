"""Child process of the gRPC ceiling: a bare grpc.aio server with one unary method.

Run as ``python -m bench.ceiling.grpc_echo``. It answers ``/bench.Echo/Call`` with a fixed
200-byte payload (no interceptor, no auth, no database) and prints ``ready <port>`` once it
serves on a free loopback port.
"""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio

_ANSWER = b"x" * 200


async def _call(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return _ANSWER


async def serve() -> None:
    """Serve until killed."""
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(_call)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("bench.Echo", {"Call": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"ready {port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve())
