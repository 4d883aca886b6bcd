"""Twilio's message status callbacks: the delivery reports of SMS sent through Twilio.

Twilio posts ``application/x-www-form-urlencoded`` fields (``MessageSid``, ``MessageStatus``,
``ErrorCode``, ``AccountSid``, ``To``...) to the message's ``StatusCallback`` URL each time the
message's status changes, signed with ``X-Twilio-Signature``: base64 of the HMAC-SHA1, keyed by
the account's auth token, of the full URL followed by every field name and value, sorted by
name. Statuses ``queued``, ``sending``, ``sent`` and ``accepted`` say nothing new here;
``delivered`` is DELIVERED; ``undelivered`` and ``failed`` fail the message, and carrier errors
that mean the number does not exist or cannot take SMS are a bounce of a dead number.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence

from services.delivery.providers.base import DeliveryReport, ReportKind

__all__ = ["DEAD_NUMBER_ERRORS", "SIGNATURE_HEADER", "read_status_callback", "signature"]

SIGNATURE_HEADER = "X-Twilio-Signature"
#: Carrier errors of a number that will never receive: 30005 unknown destination handset,
#: 30006 landline or unreachable carrier, 21610 the recipient replied STOP, 21614 not a mobile
#: number, 21211 invalid number.
DEAD_NUMBER_ERRORS = frozenset({"30005", "30006", "21610", "21614", "21211"})


def signature(auth_token: str, url: str, params: Sequence[tuple[str, str]]) -> str:
    """The ``X-Twilio-Signature`` Twilio sends for a POST of ``params`` to ``url``."""
    data = url + "".join(name + value for name, value in sorted(params))
    mac = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode()


def verify(auth_token: str, url: str, params: Sequence[tuple[str, str]], header: str) -> bool:
    """Whether ``header`` is Twilio's signature of this request (constant-time)."""
    return bool(header) and hmac.compare_digest(signature(auth_token, url, params), header)


def read_status_callback(fields: Mapping[str, str]) -> DeliveryReport | None:
    """The report a status callback makes, or None when its status changes nothing."""
    status = fields.get("MessageStatus", "") or fields.get("SmsStatus", "")
    sid = fields.get("MessageSid", "") or fields.get("SmsSid", "")
    if status == "delivered":
        return DeliveryReport(ReportKind.DELIVERED, sid, "twilio:delivered")
    if status not in ("undelivered", "failed"):
        return None
    code = fields.get("ErrorCode", "")
    detail = f"twilio:{status}" + (f" {code}" if code else "")
    if code in DEAD_NUMBER_ERRORS:
        return DeliveryReport(ReportKind.BOUNCED, sid, detail, token_invalid=True)
    return DeliveryReport(ReportKind.FAILED, sid, detail)
