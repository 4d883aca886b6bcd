"""The webhook client after a pause of its process (SIGSTOP, a VM or GC pause): an answer that
arrived in time is read, not mistaken for a timeout; a call that really got no answer says
that its request went out (``AnswerLost``), so the worker knows the receiver may have it."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from services.runtime.http_client import AddressPolicy, AnswerLost, HttpClient

LOOPBACK = AddressPolicy(allow_loopback=True)


@pytest.fixture
def endpoint() -> Iterator[tuple[int, list[str]]]:
    """A receiver in its own thread (a paused event loop does not pause it): answers 200 after
    0.1 s to ``/ok``, never to ``/hang``."""
    server = socket.create_server(("127.0.0.1", 0))
    seen: list[str] = []
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            path = data.split(b" ", 2)[1].decode()
            seen.append(path)
            if path == "/hang":
                stop.wait(10)
                return
            time.sleep(0.1)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            stop.wait(2)

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], seen
    finally:
        stop.set()
        thread.join(2)
        server.close()


async def test_an_answer_that_arrived_during_a_pause_is_read(
    endpoint: tuple[int, list[str]],
) -> None:
    port, seen = endpoint
    client = HttpClient()
    loop = asyncio.get_running_loop()
    # Freeze the whole event loop for 1.5 s right after the request went out; the receiver
    # answers 0.1 s later, long before the 0.5 s timeout would have fired without the pause.
    loop.call_later(0.05, time.sleep, 1.5)
    response = await client.request(
        "POST", f"http://127.0.0.1:{port}/ok", headers={}, body=b"{}", policy=LOOPBACK, timeout=0.5
    )
    client.close()
    assert response.status == 200
    assert seen == ["/ok"]


async def test_a_call_without_an_answer_is_reported_as_possibly_received(
    endpoint: tuple[int, list[str]],
) -> None:
    port, seen = endpoint
    client = HttpClient()
    started = time.monotonic()
    with pytest.raises(AnswerLost):
        await client.request(
            "POST",
            f"http://127.0.0.1:{port}/hang",
            headers={},
            body=b"{}",
            policy=LOOPBACK,
            timeout=0.5,
        )
    client.close()
    assert time.monotonic() - started < 2.0  # no grace without a pause
    assert seen == ["/hang"]


async def test_a_refused_connection_is_not_an_unknown_outcome() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed when the block ends: nobody listens there
    client = HttpClient()
    with pytest.raises(ConnectionRefusedError) as raised:
        await client.request(
            "POST", f"http://127.0.0.1:{port}/", headers={}, body=b"", policy=LOOPBACK, timeout=1
        )
    assert not isinstance(raised.value, AnswerLost)
