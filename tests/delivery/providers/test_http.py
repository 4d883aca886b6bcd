"""The shared HTTP rules: status classes, Retry-After, and calls that get no answer."""

from __future__ import annotations

import asyncio
import email.utils
import importlib.abc
import sys

import httpx
import pytest

from services.delivery.providers.base import CredentialsError, Outcome
from services.delivery.providers.http import (
    HttpClient,
    endpoint_from,
    outcome_for_status,
    parse_retry_after,
    result_for_status,
)
from tests.delivery.providers.fakes.server import FakeHttpServer, Reply, Request
from tests.delivery.providers.support import closed_port

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 7 ", 7.0),
        (email.utils.formatdate(NOW + 90, usegmt=True), 90.0),
        (email.utils.formatdate(NOW - 90, usegmt=True), 0.0),  # a date past is "now"
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        (None, None),
        ("", None),
        ("-5", None),
        ("1.5", None),
        ("soon", None),
    ],
)
def test_retry_after_in_seconds_or_as_an_http_date(
    value: str | None, expected: float | None
) -> None:
    assert parse_retry_after(value, now=NOW) == expected


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.SENT),
        (201, Outcome.SENT),
        (204, Outcome.SENT),
        (400, Outcome.FAILED),
        (401, Outcome.FAILED),
        (404, Outcome.FAILED),
        (410, Outcome.FAILED),
        (413, Outcome.FAILED),
        (408, Outcome.RETRY),
        (425, Outcome.RETRY),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (502, Outcome.RETRY),
        (503, Outcome.RETRY),
        (301, Outcome.RETRY),
    ],
)
def test_status_classes(status: int, outcome: Outcome) -> None:
    assert outcome_for_status(status) is outcome


def test_a_retry_carries_retry_after_and_a_failure_does_not() -> None:
    retry = result_for_status("x", httpx.Response(503, headers={"retry-after": "30"}), "busy")
    failed = result_for_status(
        "x", httpx.Response(400, headers={"retry-after": "30"}), token_invalid=True
    )
    sent = result_for_status("x", httpx.Response(200), provider_message_id="m1", token_invalid=True)

    assert (retry.outcome, retry.retry_after, retry.detail) == (Outcome.RETRY, 30.0, "x:busy")
    assert (failed.outcome, failed.retry_after, failed.detail) == (Outcome.FAILED, None, "x:400")
    assert failed.token_invalid
    assert (sent.outcome, sent.provider_message_id, sent.token_invalid) == (
        Outcome.SENT,
        "m1",
        False,
    )


def test_endpoint_overrides_are_urls() -> None:
    assert endpoint_from({}, "https://api.example.com") == "https://api.example.com"
    assert endpoint_from({"endpoint": "http://127.0.0.1:9/"}, "x") == "http://127.0.0.1:9"
    for bad in ("ftp://host", "no-scheme", 42):
        with pytest.raises(CredentialsError, match=r"^endpoint:"):
            endpoint_from({"endpoint": bad}, "x")


class _Slow(FakeHttpServer):
    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def answer(self, request: Request) -> Reply:
        await self.release.wait()
        return Reply(200)


async def test_a_timeout_is_a_retry() -> None:
    http = HttpClient(timeout=0.2)
    async with _Slow() as slow:
        try:
            result = await http.request("x", "POST", f"{slow.url}/send", json={})
        finally:
            slow.release.set()
            await http.aclose()

    assert not isinstance(result, httpx.Response)
    assert result.outcome is Outcome.RETRY
    assert result.detail.startswith("x:timeout")
    # The request went out and the answer did not come: the provider may have it.
    assert result.maybe_delivered


async def test_a_refused_connection_is_a_retry() -> None:
    http = HttpClient(timeout=1)
    try:
        result = await http.request("x", "GET", f"http://127.0.0.1:{closed_port()}/")
    finally:
        await http.aclose()

    assert not isinstance(result, httpx.Response)
    assert result.outcome is Outcome.RETRY
    assert result.detail.startswith("x:unreachable")
    assert not result.maybe_delivered  # nothing went out: an ordinary retry


async def test_a_lent_client_is_not_closed() -> None:
    client = httpx.AsyncClient()
    http = HttpClient(client=client)

    await http.aclose()

    assert not client.is_closed
    await client.aclose()


class _Ok(FakeHttpServer):
    async def answer(self, request: Request) -> Reply:
        return Reply(200)


class _MissedImports(importlib.abc.MetaPathFinder):
    """Last on ``sys.meta_path``: asked only about modules no other finder has, i.e. imports
    that fail (and, uncached, cost a search of ``sys.path`` every time)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        self.names.append(fullname)


async def test_a_call_imports_nothing_that_is_missing() -> None:
    http = HttpClient(timeout=5)
    missed = _MissedImports()
    async with _Ok() as server:
        try:
            first = await http.request("x", "POST", f"{server.url}/send", json={})  # warm
            sys.meta_path.append(missed)
            try:
                answers = [
                    await http.request("x", "POST", f"{server.url}/send", json={"n": n})
                    for n in range(5)
                ]
            finally:
                sys.meta_path.remove(missed)
        finally:
            await http.aclose()

    assert isinstance(first, httpx.Response)
    assert [a.status_code for a in answers if isinstance(a, httpx.Response)] == [200] * 5
    assert missed.names == []
