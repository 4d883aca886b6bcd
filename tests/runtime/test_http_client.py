"""The webhook client frames each request itself: the caller's headers cannot change where a
request ends or which host it is for."""

from __future__ import annotations

import asyncio

from services.runtime.http_client import AddressPolicy, HttpClient

LOOPBACK = AddressPolicy(allow_loopback=True)


async def test_framing_headers_from_the_caller_are_not_sent() -> None:
    heads: list[list[str]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        heads.append([line for line in head.split("\r\n")[1:] if line])
        await reader.readexactly(7)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = HttpClient()
    try:
        response = await client.request(
            "POST",
            f"http://127.0.0.1:{port}/hook",
            headers={
                "Host": "internal.example",
                "content-length": "0",
                "Transfer-Encoding": "chunked",
                "X-Plan": "gold",
            },
            body=b'{"a":1}',
            policy=LOOPBACK,
            timeout=5,
        )
    finally:
        client.close()
        server.close()
        await server.wait_closed()

    assert response.status == 204
    [head] = heads
    names = [line.split(":", 1)[0].lower() for line in head]
    assert sorted(names) == ["content-length", "host", "x-plan"]
    assert f"Host: 127.0.0.1:{port}" in head
    assert "Content-Length: 7" in head
