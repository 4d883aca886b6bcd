"""Email bounces and complaints: delivery status notifications (RFC 3464) and abuse feedback
reports (ARF, RFC 5965), as the bounce mailbox receives them.

A mail server that accepted a message (250 to DATA) may still fail to deliver it later; it then
mails a ``multipart/report; report-type=delivery-status`` to the envelope sender, with a
``message/delivery-status`` part (per recipient: ``Action``, ``Status``, ``Diagnostic-Code``)
and the original message or its headers, whose ``Message-ID`` (derived from the send ledger's
key) names the message. Mailbox providers' feedback loops send ``report-type=feedback-report``
when the recipient marks a message as spam.

* ``Action: failed`` is a bounce; its ``Status`` says whether the address is dead: ``5.1.x``
  (bad mailbox, bad domain) and ``5.2.1`` (mailbox disabled) are, so identity disables the
  subscription; others (``5.7.1`` policy, ``5.2.2`` mailbox full, ``4.x.x`` given up) are not.
* ``Action: delivered`` (a success notification, when one was asked for) is DELIVERED.
* ``delayed``, ``relayed`` and ``expanded`` change nothing.
* A feedback report is a complaint.
"""

from __future__ import annotations

import email
import email.policy
from email.message import Message
from email.parser import HeaderParser

from services.delivery.providers.base import DeliveryReport, ReportKind

__all__ = ["dead_address_status", "read_bounce"]


def dead_address_status(status: str) -> bool:
    """Whether an enhanced status code (RFC 3463) says the address itself is dead."""
    return status.startswith("5.1.") or status == "5.2.1"


def _original_message_id(report: Message) -> str:
    for part in report.walk():
        content_type = part.get_content_type()
        headers: Message | None = None
        if content_type == "message/rfc822":
            payload = part.get_payload()
            first = payload[0] if isinstance(payload, list) and payload else None
            headers = first if isinstance(first, Message) else None
        elif content_type == "text/rfc822-headers":
            raw = part.get_payload(decode=True)
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            headers = HeaderParser().parsestr(text)
        if headers is not None and headers.get("Message-ID"):
            return str(headers["Message-ID"]).strip().strip("<>")
    return ""


def _recipient_blocks(report: Message) -> list[Message]:
    for part in report.walk():
        if part.get_content_type() == "message/delivery-status":
            blocks = part.get_payload()
            # The first block is about the message, the others are one per recipient.
            if not isinstance(blocks, list):
                return []
            return [block for block in blocks[1:] if isinstance(block, Message)]
    return []


def read_bounce(raw: bytes) -> list[DeliveryReport]:
    """The reports in a bounce or complaint email (empty for any other email).

    Raises:
        ValueError: Neither a delivery status notification nor a feedback report naming the
            original message.
    """
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    if message.get_content_type() != "multipart/report":
        raise ValueError("not a multipart/report (RFC 6522) email")
    report_type = (message.get_param("report-type") or "").lower()  # type: ignore[union-attr]
    message_id = _original_message_id(message)
    if not message_id:
        raise ValueError("the report does not include the original Message-ID")
    if report_type == "feedback-report":
        return [DeliveryReport(ReportKind.COMPLAINED, message_id, "email:complaint")]
    if report_type != "delivery-status":
        raise ValueError(f"unknown report-type {report_type!r}")
    reports = []
    for block in _recipient_blocks(message):
        action = str(block.get("Action", "")).strip().lower()
        status = str(block.get("Status", "")).strip()
        diagnostic = " ".join(str(block.get("Diagnostic-Code", "")).split())
        detail = f"email:{action} {status} {diagnostic}".strip()
        if action == "delivered":
            reports.append(DeliveryReport(ReportKind.DELIVERED, message_id, detail))
        elif action == "failed":
            reports.append(
                DeliveryReport(
                    ReportKind.BOUNCED,
                    message_id,
                    detail,
                    token_invalid=dead_address_status(status),
                )
            )
    return reports
