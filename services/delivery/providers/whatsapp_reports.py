"""WhatsApp Cloud API webhooks: the status updates of messages sent through the Cloud API.

The Meta app's webhook (one URL per WhatsApp Business app) is first verified with a GET
carrying ``hub.mode=subscribe``, ``hub.verify_token`` (the token the app chose) and
``hub.challenge``, which must be echoed. Then every change is a POST of JSON
``{"object": "whatsapp_business_account", "entry": [{"changes": [{"field": "messages", "value":
{"statuses": [{"id": <wamid>, "status": "sent|delivered|read|failed", "recipient_id",
"errors": [{"code", "title"}]}]}}]}]}``, signed with ``X-Hub-Signature-256: sha256=<hex
HMAC-SHA256 of the raw body, keyed by the Meta app secret>``.

``delivered`` is DELIVERED, ``read`` a read receipt, ``failed`` fails the message (error 131026,
a number that cannot receive WhatsApp messages, is a bounce of a dead number); ``sent`` changes
nothing. Incoming customer messages in the same webhook are not delivery's business and ignored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from services.delivery.providers.base import DeliveryReport, ReportKind
from services.delivery.providers.whatsapp import DEAD_NUMBER_CODES

__all__ = ["SIGNATURE_HEADER", "read_status_webhook", "signature", "verify"]

SIGNATURE_HEADER = "X-Hub-Signature-256"
_KINDS = {"delivered": ReportKind.DELIVERED, "read": ReportKind.READ}


def signature(app_secret: str, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` value Meta sends with ``body``."""
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


def verify(app_secret: str, body: bytes, header: str) -> bool:
    """Whether ``header`` is Meta's signature of ``body`` (constant-time)."""
    return bool(header) and hmac.compare_digest(signature(app_secret, body), header.strip())


def _report(status: dict[str, Any]) -> DeliveryReport | None:
    wamid = str(status.get("id") or "")
    state = str(status.get("status") or "")
    if not wamid:
        return None
    if state in _KINDS:
        return DeliveryReport(_KINDS[state], wamid, f"whatsapp:{state}")
    if state != "failed":
        return None
    errors = status.get("errors")
    first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}
    code = first.get("code")
    detail = f"whatsapp:failed {code} {first.get('title', '')}".strip()
    if code in DEAD_NUMBER_CODES:
        return DeliveryReport(ReportKind.BOUNCED, wamid, detail, token_invalid=True)
    return DeliveryReport(ReportKind.FAILED, wamid, detail)


def read_status_webhook(body: bytes) -> list[DeliveryReport]:
    """The status reports of a webhook POST (its messages and other changes are ignored).

    Raises:
        ValueError: Not the JSON of a WhatsApp webhook.
    """
    payload = json.loads(body)
    if not isinstance(payload, dict) or not isinstance(payload.get("entry", []), list):
        raise ValueError("not a WhatsApp webhook")
    reports = []
    for entry in payload.get("entry", []):
        for change in entry.get("changes", []) if isinstance(entry, dict) else []:
            value = change.get("value") if isinstance(change, dict) else None
            statuses = value.get("statuses", []) if isinstance(value, dict) else []
            for status in statuses if isinstance(statuses, list) else []:
                report = _report(status) if isinstance(status, dict) else None
                if report is not None:
                    reports.append(report)
    return reports
