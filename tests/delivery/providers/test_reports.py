"""The providers' delivery report parsers, without a server: which report each answer makes."""

from __future__ import annotations

import pytest

from services.delivery.providers import bounces, twilio_reports, whatsapp_reports
from services.delivery.providers.base import DeliveryReport, ReportKind


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"MessageSid": "SM1", "MessageStatus": "queued"}, None),
        ({"MessageSid": "SM1", "MessageStatus": "sent"}, None),
        (
            {"MessageSid": "SM1", "MessageStatus": "delivered"},
            DeliveryReport(ReportKind.DELIVERED, "SM1", "twilio:delivered"),
        ),
        (
            {"MessageSid": "SM1", "MessageStatus": "undelivered", "ErrorCode": "30003"},
            DeliveryReport(ReportKind.FAILED, "SM1", "twilio:undelivered 30003"),
        ),
        (
            {"SmsSid": "SM1", "SmsStatus": "failed", "ErrorCode": "30006"},
            DeliveryReport(ReportKind.BOUNCED, "SM1", "twilio:failed 30006", token_invalid=True),
        ),
    ],
)
def test_twilio_statuses(fields: dict[str, str], expected: DeliveryReport | None) -> None:
    assert twilio_reports.read_status_callback(fields) == expected


def test_twilio_signature_is_twilios_documented_example() -> None:
    # The example of Twilio's "Webhooks security" page.
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    params = [
        ("CallSid", "CA1234567890ABCDE"),
        ("Caller", "+12349013030"),
        ("Digits", "1234"),
        ("From", "+12349013030"),
        ("To", "+18005551212"),
    ]
    expected = "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    assert twilio_reports.signature("12345", url, params) == expected
    assert twilio_reports.verify("12345", url, params, expected)
    assert not twilio_reports.verify("12345", url, params[:-1], expected)
    assert not twilio_reports.verify("12345", url, params, "")


def test_whatsapp_webhooks_that_are_not_statuses() -> None:
    assert whatsapp_reports.read_status_webhook(b'{"object": "x", "entry": []}') == []
    incoming = b'{"entry": [{"changes": [{"value": {"messages": [{"id": "wamid.in"}]}}]}]}'
    assert whatsapp_reports.read_status_webhook(incoming) == []
    with pytest.raises(ValueError, match="not a WhatsApp webhook"):
        whatsapp_reports.read_status_webhook(b"[1, 2]")
    body = b"{}"
    assert whatsapp_reports.verify("s", body, whatsapp_reports.signature("s", body))
    assert not whatsapp_reports.verify("s", body, "sha256=00")


def _dsn(action: str, status: str) -> bytes:
    return (
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example\r\n\r\n"
        f"Final-Recipient: rfc822; a@example.com\r\nAction: {action}\r\nStatus: {status}\r\n"
        "\r\n--B\r\nContent-Type: message/rfc822\r\n\r\n"
        "Message-ID: <abc@acme.example>\r\nSubject: s\r\n\r\nbody\r\n--B--\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("action", "status", "kind", "dead"),
    [
        ("failed", "5.1.1", ReportKind.BOUNCED, True),
        ("failed", "5.2.1", ReportKind.BOUNCED, True),
        ("failed", "5.2.2", ReportKind.BOUNCED, False),
        ("failed", "4.4.7", ReportKind.BOUNCED, False),
        ("delivered", "2.0.0", ReportKind.DELIVERED, False),
        ("delayed", "4.4.1", None, False),
    ],
)
def test_dsn_actions(action: str, status: str, kind: ReportKind | None, dead: bool) -> None:
    reports = bounces.read_bounce(_dsn(action, status))
    if kind is None:
        assert reports == []
        return
    [report] = reports
    assert (report.kind, report.provider_message_id, report.token_invalid) == (
        kind,
        "abc@acme.example",
        dead,
    )


def test_not_a_report() -> None:
    with pytest.raises(ValueError, match="multipart/report"):
        bounces.read_bounce(b"Subject: hi\r\n\r\nhello")
    without_original = _dsn("failed", "5.1.1").split(b"--B\r\nContent-Type: message/rfc822")[0]
    with pytest.raises(ValueError, match="Message-ID"):
        bounces.read_bounce(without_original + b"--B--\r\n")
