"""What every HTTP provider adapter shares: one pooled httpx client and the status rules.

The rules (DESIGN.md §4): 2xx is SENT; 4xx other than 408, 425 and 429 is FAILED (retrying
cannot help); 408 (Request Timeout), 425 (Too Early), 429, 5xx, timeouts and connection errors
are RETRY, with the provider's ``Retry-After``
(seconds or an HTTP date) passed on so the worker's backoff honours it; a RETRY whose request
may have reached the provider (its answer was lost) says so (``maybe_delivered``). Adapters
refine the rules with what the provider says in the body (a dead token, an expired credential).
"""

from __future__ import annotations

import email.utils
import json
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from services.delivery.providers.base import CredentialsError, Outcome, ProviderResult

__all__ = [
    "DEFAULT_TIMEOUT",
    "RETRYABLE_4XX",
    "HttpClient",
    "endpoint_from",
    "json_body",
    "not_sent",
    "outcome_for_status",
    "parse_retry_after",
    "require_text",
    "result_for_status",
    "unreachable",
]

#: 4xx answers that say "not now" rather than "never": Request Timeout, Too Early, Too Many
#: Requests (the webhook channel retries the same ones).
RETRYABLE_4XX = frozenset({408, 425, 429})
#: Seconds an adapter waits for a provider (connect, write and each read).
DEFAULT_TIMEOUT = 10.0
#: The answer of a provider we never read whole: a misbehaving server cannot fill our memory.
_MAX_ERROR_BODY = 64 * 1024


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 §10.2.3).

    Args:
        value: The header: delay-seconds (``"120"``) or an HTTP date.
        now: The current Unix time, for the HTTP-date form (defaults to the clock).

    Returns:
        The delay (never negative), or None when the header is absent or unreadable.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isdigit():
        return float(text)
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:  # "-0000" dates parse naive; HTTP dates are always GMT
        return None
    current = time.time() if now is None else now
    return max(0.0, moment.timestamp() - current)


def outcome_for_status(status: int) -> Outcome:
    """The outcome an HTTP status means when the body says nothing more precise."""
    if 200 <= status < 300:
        return Outcome.SENT
    if status in RETRYABLE_4XX or status >= 500:
        return Outcome.RETRY
    # 1xx/3xx are not answers a provider API gives; treat them as a provider fault, not ours.
    if status < 400:
        return Outcome.RETRY
    return Outcome.FAILED


def result_for_status(
    adapter: str,
    response: httpx.Response,
    reason: str = "",
    *,
    provider_message_id: str = "",
    token_invalid: bool = False,
    outcome: Outcome | None = None,
    retry_after: float | None = None,
) -> ProviderResult:
    """The classified result of a provider's answer.

    Args:
        adapter: The adapter's name, the prefix of ``detail``.
        response: The provider's answer.
        reason: The provider's reason, when the body gives one (else the status code).
        provider_message_id: The provider's id of the message (SENT).
        token_invalid: The answer says the address is dead.
        outcome: Overrides the status rule (a body that says "rate limited" under a 400).
        retry_after: Overrides the ``Retry-After`` header (a body that says how long).
    """
    final = outcome_for_status(response.status_code) if outcome is None else outcome
    if final is Outcome.RETRY and retry_after is None:
        retry_after = parse_retry_after(response.headers.get("retry-after"))
    detail = f"{adapter}:{reason or response.status_code}"
    return ProviderResult(
        outcome=final,
        provider_message_id=provider_message_id if final is Outcome.SENT else "",
        detail=detail if final is not Outcome.SENT else "",
        token_invalid=token_invalid and final is Outcome.FAILED,
        retry_after=retry_after if final is Outcome.RETRY else None,
    )


#: Failures that happen before any byte of the request left: the provider never saw the call.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


def unreachable(adapter: str, error: BaseException) -> ProviderResult:
    """RETRY for a call that got no answer (timeout, refused or dropped connection).

    A failure after the request may have gone out (a read or write timeout, a connection
    dropped while waiting for the answer) is marked ``maybe_delivered``: the provider may have
    accepted it, so the worker repeats it only on channels that drop a repeated key.
    """
    kind = "timeout" if isinstance(error, httpx.TimeoutException) else "unreachable"
    text = str(error) or type(error).__name__
    return ProviderResult(
        outcome=Outcome.RETRY,
        detail=f"{adapter}:{kind}: {text}",
        maybe_delivered=not isinstance(error, _NOT_SENT),
    )


def not_sent(adapter: str, reason: str) -> ProviderResult:
    """FAILED without a provider call: unusable credentials, content or address."""
    return ProviderResult(outcome=Outcome.FAILED, detail=f"{adapter}:{reason}")


def json_body(response: httpx.Response) -> dict[str, Any]:
    """The answer's JSON object, or ``{}`` when it is not one (an HTML error page)."""
    if len(response.content) > _MAX_ERROR_BODY:
        return {}
    try:
        value = json.loads(response.content)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def require_text(credentials: Mapping[str, Any], field: str) -> str:
    """A required, non-empty string field of a channel's credentials.

    Raises:
        CredentialsError: Naming the field when it is missing, empty or not a string.
    """
    value = credentials.get(field)
    if not isinstance(value, str) or not value.strip():
        raise CredentialsError(f"{field}: required")
    return value.strip()


def endpoint_from(credentials: Mapping[str, Any], default: str, field: str = "endpoint") -> str:
    """The provider's base URL: the credentials' override (a proxy, a test server) or default.

    Raises:
        CredentialsError: When the override is not an http(s) URL.
    """
    value = credentials.get(field)
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise CredentialsError(f"{field}: must be a URL")
    try:
        url = httpx.URL(value.strip())
    except httpx.InvalidURL as error:
        raise CredentialsError(f"{field}: not a URL ({error})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise CredentialsError(f"{field}: must be an http(s) URL")
    return str(url).rstrip("/")


class HttpClient:
    """One pooled httpx client for an adapter, shared by all the worker's tasks.

    Args:
        client: A client to use instead of making one (tests, a proxy); not closed by us.
        timeout: Seconds for connect, write and each read.
        http2: Speak HTTP/2 over TLS (APNs requires it).
        verify: Passed to httpx: False, or an ``ssl.SSLContext`` trusting a test CA.
        max_connections: The pool's size.
    """

    def __init__(
        self,
        *,
        client: httpx.AsyncClient | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        http2: bool = False,
        verify: ssl.SSLContext | bool = True,
        max_connections: int = 100,
    ) -> None:
        self._borrowed = client is not None
        self._max_connections = max_connections
        self._factory: Callable[[], httpx.AsyncClient] = lambda: httpx.AsyncClient(
            http2=http2,
            timeout=httpx.Timeout(timeout),
            verify=verify,
            limits=httpx.Limits(max_connections=max_connections),
            follow_redirects=False,
            # Provider calls go straight out: no proxy or netrc picked up from the environment.
            trust_env=False,
        )
        self._client = client

    @property
    def max_in_flight(self) -> int:
        """Calls that can be on the wire at once: one per pooled connection (HTTP/1.1)."""
        return self._max_connections

    @property
    def client(self) -> httpx.AsyncClient:
        """The httpx client, made on first use (inside the running loop)."""
        if self._client is None:
            self._client = self._factory()
        return self._client

    async def request(
        self, adapter: str, method: str, url: str, **kwargs: Any
    ) -> httpx.Response | ProviderResult:
        """Make one call; a call that got no answer comes back as a RETRY result.

        Args:
            adapter: The adapter's name, for the result's ``detail``.
            method: The HTTP method.
            url: The full URL.
            **kwargs: ``httpx.AsyncClient.request`` arguments (headers, json, data, content...).
        """
        try:
            return await self.client.request(method, url, **kwargs)
        except httpx.TransportError as error:
            return unreachable(adapter, error)

    async def aclose(self) -> None:
        """Close the pool, unless the client was lent to us."""
        if self._client is not None and not self._borrowed:
            await self._client.aclose()
        self._client = None
