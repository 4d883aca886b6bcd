"""A webhook receiver that misbehaves on purpose and logs every call it got.

It answers like the webhook sink of ``tests/delivery/sink.py`` (200, keep-alive), but for a
seeded share of calls it plays a bad provider instead: 429 with ``Retry-After``, 503, accept the
request and never answer (until the caller gives up), or drop the connection after reading the
request. Which calls misbehave is a function of (seed, idempotency key, attempt), not of arrival
order, so a seed picks the same faults on every run; and only the first ``max_faults`` calls of
a key can misbehave, so every message can still get through within delivery's retry budget.

Every call is logged as a :class:`Call` with what the sink did with it: the checker needs to
know whether the caller ever saw a 200 (a call after that is a duplicate, unless delivery
declared that call's outcome unknown) or not (a call after a 503, a hang or a drop is a
legitimate retry with the same idempotency key). Like a receiver honouring the webhook's
``Idempotency-Key``, the sink answers a key it already answered 200 with 200 again and logs it
as a ``replay``, with no second delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Call", "FaultRates", "FaultySink"]

OK = "ok"
TOO_MANY = "429"
UNAVAILABLE = "503"
HANG = "hang"
DROP = "drop"
#: A call for a key this sink already answered 200: answered 200 again with no second effect,
#: as a receiver honouring ``Idempotency-Key`` does (the webhook contract).
REPLAY = "replay"
_REPLIES = {
    OK: (200, b'{"ok": true}'),
    REPLAY: (200, b'{"ok": true}'),
    TOO_MANY: (429, b'{"error": "slow down"}'),
    UNAVAILABLE: (503, b'{"error": "unavailable"}'),
}


@dataclass(frozen=True)
class FaultRates:
    """Shares of calls (0-1) answered each bad way; the rest get 200."""

    too_many: float = 0.0
    unavailable: float = 0.0
    hang: float = 0.0
    drop: float = 0.0
    #: Only a key's first calls may misbehave (delivery gives up after 5 attempts).
    max_faults: int = 2

    @property
    def any(self) -> bool:
        return (self.too_many + self.unavailable + self.hang + self.drop) > 0


@dataclass(frozen=True)
class Call:
    """One request the sink received and what it did with it."""

    key: str
    message_id: str
    #: The ``u`` and ``n`` fields of the JSON body (the templates of the suite put the user id
    #: and the journey node there).
    user_id: str
    node: str
    answer: str
    time: float


@dataclass
class FaultySink:
    """An HTTP endpoint logging :class:`Call` s, misbehaving per :class:`FaultRates`."""

    seed: int = 0
    rates: FaultRates = field(default_factory=FaultRates)
    #: Seconds before each answer (a slow provider keeps calls in flight).
    delay: float = 0.0
    calls: list[Call] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)
    _attempts: Counter[str] = field(default_factory=Counter)
    _answered: set[str] = field(default_factory=set)
    _server: asyncio.Server | None = None
    _hung: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def delivered(self) -> int:
        """Calls answered 200."""
        return self.answers[OK]

    async def __aenter__(self) -> FaultySink:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._hung):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def _choose(self, key: str) -> str:
        if key and key in self._answered:
            return REPLAY
        attempt = self._attempts[key]
        self._attempts[key] += 1
        rates = self.rates
        if not rates.any or attempt >= rates.max_faults:
            return OK
        digest = hashlib.blake2b(f"{self.seed}:{key}:{attempt}".encode(), digest_size=8)
        draw = int.from_bytes(digest.digest(), "big") / 2**64
        for answer, share in (
            (TOO_MANY, rates.too_many),
            (UNAVAILABLE, rates.unavailable),
            (HANG, rates.hang),
            (DROP, rates.drop),
        ):
            if draw < share:
                return answer
            draw -= share
        return OK

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                headers: dict[str, str] = {}
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                key = headers.get("idempotency-key", "")
                answer = self._choose(key)
                try:
                    fields = json.loads(body) if body else {}
                except ValueError:
                    fields = {}
                if not isinstance(fields, dict):
                    fields = {}
                self.calls.append(
                    Call(
                        key=key,
                        message_id=headers.get("x-tidings-message-id", ""),
                        user_id=str(fields.get("u", "")),
                        node=str(fields.get("n", "")),
                        answer=answer,
                        time=time.time(),
                    )
                )
                self.answers[answer] += 1
                if answer == OK:
                    self._answered.add(key)
                if answer == DROP:
                    writer.transport.abort()
                    return
                if answer == HANG:
                    # Hold the connection, answer nothing; the caller's timeout ends it.
                    task = asyncio.current_task()
                    assert task is not None
                    self._hung.add(task)
                    try:
                        await reader.read()
                    finally:
                        self._hung.discard(task)
                    return
                if self.delay:
                    await asyncio.sleep(self.delay)
                status, payload = _REPLIES[answer]
                extra = "Retry-After: 1\r\n" if answer == TOO_MANY else ""
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n{extra}\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (ConnectionError, ValueError, asyncio.CancelledError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()
