"""Webhook adapter: an HTTP call to the app's endpoint, signed, behind an SSRF guard.

Every call carries:

* ``X-Tidings-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>`` over ``"<t>.<body>"`` with the
  channel's ``signing_secret`` (Stripe's scheme: the receiver recomputes it, compares in
  constant time and refuses old timestamps, which stops replays);
* ``Idempotency-Key`` (the send-ledger key) and ``X-Tidings-Message-Id``, so a receiver can
  drop the duplicate of a call whose answer we never got (a timeout is retried).

Credentials (``ChannelConfig.credentials`` of CHANNEL_WEBHOOK): ``signing_secret`` (required,
16+ characters), ``timeout_seconds`` (1-30, default 10), and ``allow_loopback``,
``allow_private``, ``allow_link_local`` (default false: such addresses, and cloud metadata
endpoints, are refused with FAILED).

Answers: 2xx SENT; 408, 425, 429 and 5xx RETRY (with ``Retry-After``); other 4xx and 3xx
(redirects are not followed) FAILED; timeouts and connection errors RETRY — after the request
went out, ``maybe_delivered`` (the worker repeats it with the same ``Idempotency-Key``, which
the receiver must drop: see docs/delivery.md, "Each message is sent once").
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Mapping
from typing import Any

from services.delivery.providers.base import (
    Channel,
    CredentialsError,
    OutboundMessage,
    Outcome,
    ProviderResult,
    WebhookContent,
)
from services.runtime.http_client import AddressRefused, AnswerLost, HttpClient
from services.runtime.webhooks import SIGNATURE_HEADER, AddressPolicy, sign

__all__ = ["WebhookAdapter"]

DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = 30.0
_MIN_SECRET = 16
_RETRYABLE = frozenset({408, 425, 429})


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


def _flag(credentials: Mapping[str, Any], name: str) -> bool:
    value = credentials.get(name, False)
    if not isinstance(value, bool):
        raise CredentialsError(f"{name} must be true or false")
    return value


class WebhookAdapter:
    """Delivers CHANNEL_WEBHOOK messages.

    Args:
        client: The HTTP client (one pooled client per worker by default).
    """

    name = "webhook"
    channel = Channel.WEBHOOK

    def __init__(self, client: HttpClient | None = None) -> None:
        self._client = client or HttpClient()

    def check_credentials(self, credentials: Mapping[str, Any]) -> None:
        """Validate a webhook channel configuration.

        Raises:
            CredentialsError: Naming the missing or malformed field.
        """
        secret = credentials.get("signing_secret")
        if not isinstance(secret, str) or len(secret) < _MIN_SECRET:
            raise CredentialsError(
                f"signing_secret is required: a string of at least {_MIN_SECRET} characters"
            )
        timeout = credentials.get("timeout_seconds", DEFAULT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise CredentialsError("timeout_seconds must be a number")
        if not 1 <= timeout <= MAX_TIMEOUT:
            raise CredentialsError(f"timeout_seconds must be between 1 and {MAX_TIMEOUT:g}")
        for name in ("allow_loopback", "allow_private", "allow_link_local"):
            _flag(credentials, name)
        unknown = set(credentials) - {
            "signing_secret",
            "timeout_seconds",
            "allow_loopback",
            "allow_private",
            "allow_link_local",
        }
        if unknown:
            raise CredentialsError(f"unknown field {sorted(unknown)[0]}")

    async def send(
        self, message: OutboundMessage, credentials: Mapping[str, Any]
    ) -> ProviderResult:
        """Make the call and classify the answer (never raises for network trouble)."""
        content = message.content
        if not isinstance(content, WebhookContent):
            return ProviderResult(Outcome.FAILED, detail="webhook:content is not a webhook")
        policy = AddressPolicy(
            allow_loopback=bool(credentials.get("allow_loopback", False)),
            allow_private=bool(credentials.get("allow_private", False)),
            allow_link_local=bool(credentials.get("allow_link_local", False)),
        )
        timeout = float(credentials.get("timeout_seconds", DEFAULT_TIMEOUT))
        body = content.body.encode()
        headers = {
            "User-Agent": "Tidings-Webhook/1",
            "Content-Type": "application/json",
            "Connection": "keep-alive",
        }
        headers.update(content.headers)
        headers[SIGNATURE_HEADER] = sign(
            str(credentials.get("signing_secret", "")), int(time.time()), body
        )
        headers["Idempotency-Key"] = message.idempotency_key
        headers["X-Tidings-Message-Id"] = message.message_id
        try:
            response = await self._client.request(
                (content.method or "POST").upper(),
                content.url,
                headers=headers,
                body=body,
                policy=policy,
                timeout=timeout,
            )
        except AddressRefused as exc:
            return ProviderResult(Outcome.FAILED, detail=f"webhook:address refused: {exc}")
        except ValueError as exc:
            return ProviderResult(Outcome.FAILED, detail=f"webhook:bad request: {exc}")
        except AnswerLost as lost:
            # The receiver may have acted on it: repeated with the same key, which it drops.
            what = (
                f"timeout after {timeout:g}s"
                if isinstance(lost.__cause__, TimeoutError)
                else f"connection lost: {lost}"
            )
            return ProviderResult(
                Outcome.RETRY,
                detail=f"webhook:{what} (the request went out)",
                maybe_delivered=True,
            )
        except TimeoutError:
            return ProviderResult(Outcome.RETRY, detail=f"webhook:timeout after {timeout:g}s")
        except (OSError, asyncio.IncompleteReadError) as exc:
            return ProviderResult(
                Outcome.RETRY, detail=f"webhook:connection failed: {type(exc).__name__}"
            )
        status = response.status
        detail = f"webhook:HTTP {status}"
        if 200 <= status < 300:
            return ProviderResult(
                Outcome.SENT,
                provider_message_id=response.headers.get("x-request-id", ""),
                detail=detail,
            )
        if status in _RETRYABLE or status >= 500:
            return ProviderResult(
                Outcome.RETRY,
                detail=detail,
                retry_after=_retry_after(response.headers.get("retry-after")),
            )
        if 300 <= status < 400:
            return ProviderResult(Outcome.FAILED, detail=f"{detail} (redirects are not followed)")
        return ProviderResult(Outcome.FAILED, detail=detail)

    async def close(self) -> None:
        """Close the idle connections."""
        self._client.close()
