"""gRPC ceiling: the most unary calls per second a bare grpc.aio server answers a grpc.aio
client on this machine (both Python, each in its own process, the way the identity benchmark's
client and service are).

No interceptor, authentication, database or message building: only the framework. A service's
call rate can only be a fraction of it, since its own work comes on top on the same cores.
"""

from __future__ import annotations

import asyncio
import time

import grpc.aio

from bench.ceiling.child import read_line, start_child, stop_child
from bench.config import Size
from bench.context import Context
from bench.figure import Figure
from bench.registry import benchmark

#: Calls in flight at once: enough to keep the server busy (more only queues).
IN_FLIGHT = 16
READY_TIMEOUT_S = 30.0


@benchmark("ceiling.grpc_unary_calls_per_s")
async def grpc_unary_calls_per_s(ctx: Context) -> Figure:
    """Calls/s of an empty unary method, :data:`IN_FLIGHT` at a time, for a few seconds."""
    seconds = 1.0 if ctx.size is Size.TINY else 5.0
    child = await start_child("bench.ceiling.grpc_echo")
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            kind, _, port = (await read_line(child)).partition(" ")
        if kind != "ready":
            raise RuntimeError(f"the echo server did not get ready: {kind!r}")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/bench.Echo/Call", None, None)
            for _ in range(100):  # warm-up: connection, HTTP/2 settings
                await call(b"warm")
            calls = 0
            end = time.perf_counter() + seconds

            async def caller() -> None:
                nonlocal calls
                while time.perf_counter() < end:
                    await call(b"y" * 60)
                    calls += 1

            start = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(IN_FLIGHT)))
            elapsed = time.perf_counter() - start
    finally:
        await stop_child(child)
    ctx.log(f"  {calls:,} empty calls in {elapsed:.2f} s")
    return Figure("ceiling.grpc_unary_calls_per_s", calls / elapsed, "calls/s")
