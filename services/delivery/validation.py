"""Request validation for delivery: content, templates, send specs, refs, ids. Pure, no I/O.

Each ``check_*`` records violations on a :class:`FieldViolations` under the field path it is
given (``template.content.push.body``, ``spec.options[1].template_id``), so one request reports
all of its bad fields at once.
"""

from __future__ import annotations

import re
import uuid
import zoneinfo
from urllib.parse import urlsplit

from google.protobuf import duration_pb2
from tidings.delivery.v1 import message_pb2, template_pb2
from tidings.identity.v1 import user_ref_pb2

from services.delivery import channels
from services.delivery.render import compile_problem, liquid_fields
from services.runtime.errors import FieldViolations, InvalidArgument

__all__ = [
    "MAX_NAME_LENGTH",
    "MAX_OPTIONS",
    "check_content",
    "check_frequency_cap",
    "check_idempotency_key",
    "check_locale",
    "check_ref",
    "check_spec",
    "check_timezone",
    "normalize_locale",
    "parse_uuid",
    "require_uuid",
]

MAX_NAME_LENGTH = 200
MAX_OPTIONS = 8
MAX_IDEMPOTENCY_KEY = 200
#: Largest text field of a content (an email's HTML may be long; the rest far less).
MAX_FIELD_CHARS = 512 * 1024
_MIN_CAP_WINDOW = 60
_MAX_CAP_WINDOW = 31 * 24 * 3600
_LOCALE = re.compile(r"^([a-zA-Z]{2})(?:[-_]([a-zA-Z]{2}))?$")
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")
_HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})


def parse_uuid(value: str) -> uuid.UUID | None:
    """``value`` as a UUID, or None when it is not one."""
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError):
        return None


def require_uuid(field: str, value: str, what: str) -> uuid.UUID:
    """``value`` as a UUID.

    Raises:
        InvalidArgument: Naming ``field`` when it is empty or not a UUID.
    """
    violations = FieldViolations()
    parsed = parse_uuid(value)
    if not value:
        violations.add(field, f"the {what} is required", reason="REQUIRED")
    elif parsed is None:
        violations.add(field, f"not a {what} (a UUID)", reason="INVALID_FORMAT")
    violations.raise_if_any()
    assert parsed is not None
    return parsed


def normalize_locale(value: str) -> str | None:
    """``es``, ``pt-BR`` in canonical case (``pt_br`` -> ``pt-BR``); None if malformed."""
    match = _LOCALE.match(value.strip())
    if match is None:
        return None
    language, region = match.group(1).lower(), match.group(2)
    return f"{language}-{region.upper()}" if region else language


def check_locale(violations: FieldViolations, field: str, value: str) -> None:
    """Record a violation unless ``value`` is a locale like ``es`` or ``pt-BR``."""
    if normalize_locale(value) is None:
        violations.add(field, "not a locale such as 'es' or 'pt-BR'", reason="INVALID_FORMAT")


def check_timezone(violations: FieldViolations, field: str, value: str) -> None:
    """Record a violation unless ``value`` is empty or an IANA time zone."""
    if not value:
        return
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):  # OSError: name too long
        violations.add(field, "not an IANA time zone such as 'Europe/Madrid'")


def _check_url(violations: FieldViolations, field: str, value: str, *, required: bool) -> None:
    if not value:
        if required:
            violations.add(field, "required", reason="REQUIRED")
        return
    if "{" in value:  # personalised: checked once rendered
        return
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        violations.add(field, "not an http(s) URL", reason="INVALID_FORMAT")


def check_content(
    violations: FieldViolations, field: str, content: template_pb2.MessageContent, channel: str
) -> None:
    """Record what is wrong with ``content`` for ``channel`` (kind, required fields, Liquid).

    Args:
        violations: Where to record.
        field: Path of the content in the request.
        content: The content.
        channel: A channel name (``ios_push``, ``push``, ``email``...).
    """
    kind = content.WhichOneof("kind")
    expected = channels.content_kind_for(channel)
    if kind is None:
        violations.add(field, f"required: {expected} content", reason="REQUIRED")
        return
    if kind != expected:
        violations.add(
            f"{field}.{kind}",
            f"a {channel} message takes {expected} content, not {kind}",
            reason="CONTENT_CHANNEL_MISMATCH",
        )
        return
    if kind == "push" and not content.push.body:
        violations.add(f"{field}.push.body", "required", reason="REQUIRED")
    elif kind == "email":
        if not content.email.subject:
            violations.add(f"{field}.email.subject", "required", reason="REQUIRED")
        if not content.email.html and not content.email.text:
            violations.add(f"{field}.email.html", "an HTML or a text body is required")
    elif kind == "text":
        text = content.text
        if text.whatsapp_template and channel != "whatsapp":
            violations.add(f"{field}.text.whatsapp_template", "only for WhatsApp messages")
        if not text.text and not text.whatsapp_template:
            violations.add(f"{field}.text.text", "required", reason="REQUIRED")
    elif kind == "webhook":
        hook = content.webhook
        _check_url(violations, f"{field}.webhook.url", hook.url, required=True)
        if hook.method and hook.method.upper() not in _HTTP_METHODS:
            violations.add(f"{field}.webhook.method", "one of GET, POST, PUT, PATCH, DELETE")
        for name in hook.headers:
            if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
                violations.add(f"{field}.webhook.headers", f"{name!r} is not a header name")
    elif kind == "in_app":
        if not content.in_app.body:
            violations.add(f"{field}.in_app.body", "required", reason="REQUIRED")
        if len(content.in_app.buttons) > 3:
            violations.add(f"{field}.in_app.buttons", "at most 3 buttons")
    for path, source in liquid_fields(content):
        if len(source) > MAX_FIELD_CHARS:
            violations.add(f"{field}.{path}", f"longer than {MAX_FIELD_CHARS} characters")
            continue
        problem = compile_problem(source)
        if problem is not None:
            violations.add(
                f"{field}.{path}", f"not a valid Liquid template: {problem}", reason="LIQUID_SYNTAX"
            )


def check_frequency_cap(
    violations: FieldViolations, field: str, cap: message_pb2.FrequencyCap
) -> None:
    """Record what is wrong with a frequency cap (a negative count, a window out of range)."""
    if cap.max_messages < 0:
        violations.add(f"{field}.max_messages", "must not be negative")
    if cap.max_messages > 0:
        seconds = _seconds(cap.window)
        if not _MIN_CAP_WINDOW <= seconds <= _MAX_CAP_WINDOW:
            violations.add(f"{field}.window", "between 1 minute and 31 days")
    if cap.action not in message_pb2.FrequencyCap.Action.values():
        violations.add(f"{field}.action", "unknown action")


def _seconds(duration: duration_pb2.Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def check_ref(violations: FieldViolations, field: str, ref: user_ref_pb2.UserRef) -> None:
    """Record what is wrong with a UserRef (unset, empty, malformed ids)."""
    kind = ref.WhichOneof("ref")
    if kind is None:
        violations.add(
            field,
            "name the user by user_id, external_id, alias or subscription_id",
            reason="REQUIRED",
        )
    elif kind == "user_id" and parse_uuid(ref.user_id) is None:
        violations.add(f"{field}.user_id", "not a user id (a UUID)", reason="INVALID_FORMAT")
    elif kind == "subscription_id" and parse_uuid(ref.subscription_id) is None:
        violations.add(
            f"{field}.subscription_id", "not a subscription id (a UUID)", reason="INVALID_FORMAT"
        )
    elif kind == "external_id" and not ref.external_id.strip():
        violations.add(f"{field}.external_id", "required", reason="REQUIRED")
    elif kind == "alias" and (not ref.alias.label or not ref.alias.value):
        violations.add(f"{field}.alias", "label and value are required", reason="REQUIRED")


def check_idempotency_key(violations: FieldViolations, field: str, key: str) -> None:
    """Record a violation unless ``key`` is empty or printable ASCII of at most 200 chars."""
    if key and (len(key) > MAX_IDEMPOTENCY_KEY or not _PRINTABLE.match(key)):
        violations.add(field, "printable ASCII without spaces, at most 200 characters")


def check_spec(violations: FieldViolations, field: str, spec: message_pb2.MessageSpec) -> None:
    """Record what is wrong with a send spec: options (channel, source), TTL, cap, locale."""
    if not spec.options:
        violations.add(
            f"{field}.options", "at least one send option is required", reason="REQUIRED"
        )
    if len(spec.options) > MAX_OPTIONS:
        violations.add(f"{field}.options", f"at most {MAX_OPTIONS} options")
    for i, option in enumerate(spec.options):
        check_option(violations, f"{field}.options[{i}]", option)
    if spec.HasField("ttl") and _seconds(spec.ttl) <= 0:
        violations.add(f"{field}.ttl", "must be positive")
    if spec.HasField("frequency_cap"):
        check_frequency_cap(violations, f"{field}.frequency_cap", spec.frequency_cap)
    if spec.locale:
        check_locale(violations, f"{field}.locale", spec.locale)


def check_option(violations: FieldViolations, field: str, option: message_pb2.SendOption) -> None:
    """Record what is wrong with one send option."""
    source = option.WhichOneof("source")
    channel = channels.channel_name(option.channel) if option.channel else None
    if option.channel and channel is None:
        violations.add(f"{field}.channel", "unknown channel")
    if source is None:
        violations.add(field, "set template_id or content", reason="REQUIRED")
    elif source == "template_id":
        if parse_uuid(option.template_id) is None:
            violations.add(f"{field}.template_id", "not a template id (a UUID)")
    else:
        if channel is None:
            if not option.channel:
                violations.add(
                    f"{field}.channel", "required with inline content", reason="REQUIRED"
                )
        else:
            check_content(violations, f"{field}.content", option.content, channel)
    if option.template_version < 0:
        violations.add(f"{field}.template_version", "must not be negative")


def invalid(field: str, description: str, reason: str = "INVALID_FIELDS") -> InvalidArgument:
    """An InvalidArgument naming one field."""
    violations = FieldViolations()
    violations.add(field, description)
    try:
        violations.raise_if_any(reason=reason)
    except InvalidArgument as error:
        return error
    raise AssertionError("unreachable")
