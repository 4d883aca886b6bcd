"""Logging formats and the asyncio metrics endpoint."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from prometheus_client import Counter

from services.runtime.logging import bind_log_fields, configure_logging
from services.runtime.metrics import Metrics, MetricsServer


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging replaces the root handlers; put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
async def test_json_lines_carry_service_request_fields_and_extra() -> None:
    stream = io.StringIO()
    log = configure_logging("identity", log_format="json", level="INFO", stream=stream)

    async def one_request() -> None:
        bind_log_fields(method="/tidings.identity.v1.IdentityService/GetUser", app_id="app-1")
        log.info("rpc done", extra={"code": "OK", "duration_ms": 1.5})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")

    await asyncio.create_task(one_request())
    log.info("outside any request")
    log.debug("not at INFO")

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 3
    first, failed, outside = lines
    assert first["service"] == "identity"
    assert first["level"] == "INFO"
    assert first["msg"] == "rpc done"
    assert first["logger"] == "tidings.identity"
    assert first["method"] == "/tidings.identity.v1.IdentityService/GetUser"
    assert first["app_id"] == "app-1"
    assert (first["code"], first["duration_ms"]) == ("OK", 1.5)
    assert first["ts"].endswith("+00:00")
    assert "ValueError: boom" in failed["exc"]
    # Fields bound in the request's task do not leak into other contexts.
    assert "method" not in outside
    assert "app_id" not in outside


@pytest.mark.usefixtures("restore_logging")
def test_text_lines_are_readable() -> None:
    stream = io.StringIO()
    log = configure_logging("journey", log_format="text", level="DEBUG", stream=stream)
    log.debug("hello %s", "there", extra={"code": "OK"})
    line = stream.getvalue().strip()
    assert " DEBUG   journey tidings.journey: hello there code=OK" in line


@pytest.fixture
async def metrics_server() -> AsyncIterator[tuple[Metrics, int]]:
    metrics = Metrics()
    server = MetricsServer(metrics, "127.0.0.1", 0)
    await server.start()
    try:
        yield metrics, server.port
    finally:
        await server.stop()


async def _http(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        raw = await reader.read()  # the server closes after one answer
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return status, headers, body


async def test_metrics_endpoint_serves_grpc_and_custom_metrics(
    metrics_server: tuple[Metrics, int],
) -> None:
    metrics, port = metrics_server
    metrics.rpc_done("/tidings.identity.v1.IdentityService/GetUser", grpc.StatusCode.OK, 0.003)
    custom = Counter("tidings_test_things_total", "Things.", registry=metrics.registry)
    custom.inc(2)

    status, headers, body = await _http(
        port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n"
    )
    assert status == "HTTP/1.1 200 OK"
    assert headers["Content-Type"].startswith("text/plain")
    assert int(headers["Content-Length"]) == len(body)
    text = body.decode()
    assert (
        'grpc_server_handled_total{grpc_code="OK",grpc_method="GetUser",'
        'grpc_service="tidings.identity.v1.IdentityService"} 1.0'
    ) in text
    assert "grpc_server_handling_seconds_bucket" in text
    assert "tidings_test_things_total 2.0" in text
    assert "process_cpu_seconds_total" in text


async def test_metrics_endpoint_rejects_other_requests(
    metrics_server: tuple[Metrics, int],
) -> None:
    _, port = metrics_server
    assert (await _http(port, b"GET / HTTP/1.1\r\n\r\n"))[0] == "HTTP/1.1 404 Not Found"
    assert (await _http(port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0].startswith("HTTP/1.1 405")
    assert (await _http(port, b"\r\n"))[0] == "HTTP/1.1 400 Bad Request"
    status, headers, body = await _http(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert status == "HTTP/1.1 200 OK"
    assert body == b""
    assert int(headers["Content-Length"]) > 0


async def test_metrics_server_stops_with_a_silent_client_connected() -> None:
    """A scraper that connects and says nothing must not keep the process from stopping."""
    server = MetricsServer(Metrics(), "127.0.0.1", 0)
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        await asyncio.wait_for(server.stop(), timeout=5)
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    finally:
        writer.close()
        await writer.wait_closed()
