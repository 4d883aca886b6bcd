"""Liquid personalisation: the variables a template sees, and rendering content with them.

Templates are Liquid (python-liquid 2) with *strict* undefined variables: ``{{ user.nickname }}``
for a user without one fails that message with reason RENDER_FAILED naming the variable (never
a crash, never an empty ``{{ }}`` hole sent), while ``{{ user.nickname | default: "there" }}``
works as users expect. The variables:

* ``user``: the profile's standard fields (``user_id``, ``external_id``, ``first_name``,
  ``last_name``, ``email``, ``phone``, ``birthdate`` as YYYY-MM-DD, ``timezone``, ``language``,
  ``country``) and its custom attributes under ``user.attributes``;
* ``event``: the triggering event's properties; ``journey``: the journey's context;
* ``data``: send-time data (the request's, with per-user data such as CSV columns merged over);
* ``message``: ``message_id``, ``channel``, ``broadcast_id``, ``requested_at_ms``.

An email's HTML body is rendered with HTML escaping: a variable's value is text, so a first name
of ``<a href=...>`` shows as written instead of becoming a link in the sender's name (and being
signed for click tracking); ``{{ value | safe }}`` inserts a value as HTML when the template
means it. Literal text in the template is the author's, never escaped.

Compiled templates are cached by source (bounded), so a broadcast parses each field once; a
field made only of text and ``{{ path }}`` / ``{{ path | default: 'text' }}`` outputs renders
by plain substitution (Liquid's result, without its per-render machinery).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import liquid
import markupsafe
from google.protobuf import json_format, struct_pb2
from liquid import Environment, StrictDefaultUndefined
from tidings.delivery.v1 import template_pb2
from tidings.identity.v1 import user_pb2

__all__ = [
    "MAX_OUTPUT_CHARS",
    "RenderError",
    "TemplateSyntaxProblem",
    "compile_problem",
    "liquid_fields",
    "render_content",
    "user_variables",
]

#: Most characters one rendered field may have (a runaway loop fails the message instead).
MAX_OUTPUT_CHARS = 1_000_000
_LOOP_LIMIT = 10_000
_CACHE_SIZE = 2_048


class RenderError(Exception):
    """A message cannot be rendered: a missing variable, a syntax or a runtime error.

    Attributes:
        field: The content field that failed (``push.body``).
        detail: What went wrong, one line (``user.nickname is undefined``).
    """

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


class _LimitedEnvironment(Environment):
    """Strict variables, and bounds on loops and output so no template can run away."""

    loop_iteration_limit = _LOOP_LIMIT
    output_stream_limit = MAX_OUTPUT_CHARS


#: ``{{ a.b.c }}`` or ``{{ a.b.c | default: 'text' }}``: the outputs the fast path renders.
_SIMPLE_OUTPUT = re.compile(
    r"""\{\{\s*([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\s*"""
    r"""(?:\|\s*default\s*:\s*(?:'([^'{}]*)'|"([^"{}]*)")\s*)?\}\}"""
)
_MISSING = object()
#: Names Liquid gives a meaning of its own (literals, ``size``/``first``/``last``).
_SPECIAL_NAMES = frozenset(
    {"true", "false", "nil", "null", "empty", "blank", "size", "first", "last"}
)


class _Simple:
    """A template made only of text and simple outputs, rendered without Liquid's machinery.

    Broadcasts render the same few fields for every user; most are plain substitutions. Only
    string and integer values are rendered here, exactly as Liquid would; anything else (a
    missing variable without a default, a float, a list...) answers None and the field goes
    through Liquid, which gives the strict error or its own formatting.
    """

    __slots__ = ("_parts",)

    def __init__(self, parts: list[str | tuple[tuple[str, ...], str | None]]) -> None:
        self._parts = parts

    @classmethod
    def parse(cls, source: str) -> _Simple | None:
        parts: list[str | tuple[tuple[str, ...], str | None]] = []
        position = 0
        for match in _SIMPLE_OUTPUT.finditer(source):
            parts.append(source[position : match.start()])
            default = match.group(2) if match.group(2) is not None else match.group(3)
            path = tuple(match.group(1).split("."))
            if _SPECIAL_NAMES.intersection(path):
                return None
            parts.append((path, default))
            position = match.end()
        parts.append(source[position:])
        texts = [part for part in parts if isinstance(part, str)]
        if any("{{" in text or "{%" in text for text in texts):
            return None  # tags, filters or other expressions: Liquid renders it
        return cls([part for part in parts if part != ""])

    def render(self, variables: Mapping[str, Any], *, html: bool = False) -> str | None:
        out: list[str] = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
                continue
            path, default = part
            value: Any = variables
            for name in path:
                if not isinstance(value, dict):
                    return None  # a property of a list or a string: Liquid's business
                value = value.get(name, _MISSING)
                if value is _MISSING:
                    break
            if default is not None and (value is _MISSING or value == ""):
                out.append(default)
            elif type(value) is str or type(value) is int:
                out.append(str(markupsafe.escape(value)) if html else str(value))
            else:
                return None
        return "".join(out)


class _Env:
    """One Liquid environment and its compiled-template cache."""

    def __init__(self, *, autoescape: bool = False) -> None:
        self.env = _LimitedEnvironment(undefined=StrictDefaultUndefined, autoescape=autoescape)
        self._cache: OrderedDict[str, tuple[Any, _Simple | None]] = OrderedDict()

    def compiled(self, source: str) -> tuple[Any, _Simple | None]:
        """The Liquid template of ``source`` and, when it is simple, its fast form."""
        cached = self._cache.get(source)
        if cached is not None:
            self._cache.move_to_end(source)
            return cached
        entry = (self.env.from_string(source), _Simple.parse(source))
        self._cache[source] = entry
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return entry

    def compile(self, source: str) -> Any:
        return self.compiled(source)[0]


_ENV = _Env()
_HTML_ENV = _Env(autoescape=True)
#: The fields whose rendered text is HTML.
_HTML_FIELDS = frozenset({"email.html"})


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


TemplateSyntaxProblem = str


def compile_problem(source: str) -> TemplateSyntaxProblem | None:
    """Why ``source`` is not a valid Liquid template, or None when it is."""
    if "{" not in source:
        return None
    try:
        _ENV.compile(source)
    except liquid.exceptions.LiquidError as exc:
        return _first_line(exc)
    return None


def _render(field: str, source: str, variables: Mapping[str, Any]) -> str:
    if "{" not in source:  # plain text: no parse, no render
        return source
    html = field in _HTML_FIELDS
    try:
        template, simple = (_HTML_ENV if html else _ENV).compiled(source)
        if simple is not None:
            rendered = simple.render(variables, html=html)
            if rendered is not None:
                return rendered
        return str(template.render(**variables))
    except liquid.exceptions.LiquidError as exc:
        raise RenderError(field, _first_line(exc)) from None
    except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:
        # Filters raise ordinary errors on odd input; the message fails, the worker goes on.
        raise RenderError(field, f"{type(exc).__name__}: {exc}") from None


def liquid_fields(content: template_pb2.MessageContent) -> list[tuple[str, str]]:
    """Every Liquid field of ``content`` as ``(path, source)``, paths relative to the content."""
    kind = content.WhichOneof("kind")
    fields: list[tuple[str, str]] = []
    if kind == "push":
        push = content.push
        for name in ("title", "body", "image_url", "deep_link", "sound"):
            fields.append((f"push.{name}", getattr(push, name)))
        fields.extend((f"push.data.{key}", value) for key, value in push.data.items())
    elif kind == "email":
        email = content.email
        for name in ("subject", "html", "text", "from_address", "reply_to"):
            fields.append((f"email.{name}", getattr(email, name)))
    elif kind == "text":
        text = content.text
        fields.append(("text.text", text.text))
        fields.extend(
            (f"text.whatsapp_parameters[{i}]", value)
            for i, value in enumerate(text.whatsapp_parameters)
        )
    elif kind == "webhook":
        hook = content.webhook
        fields.append(("webhook.url", hook.url))
        fields.append(("webhook.body", hook.body))
        fields.extend((f"webhook.headers.{key}", value) for key, value in hook.headers.items())
    elif kind == "in_app":
        in_app = content.in_app
        fields.append(("in_app.title", in_app.title))
        fields.append(("in_app.body", in_app.body))
        for i, button in enumerate(in_app.buttons):
            fields.append((f"in_app.buttons[{i}].label", button.label))
            fields.append((f"in_app.buttons[{i}].url", button.url))
    return fields


def render_content(
    content: template_pb2.MessageContent, variables: Mapping[str, Any]
) -> template_pb2.MessageContent:
    """Render every Liquid field of ``content``.

    Raises:
        RenderError: For the first field that fails.
    """
    out = template_pb2.MessageContent()
    out.CopyFrom(content)
    kind = content.WhichOneof("kind")
    if kind == "push":
        push = out.push
        for name in ("title", "body", "image_url", "deep_link", "sound"):
            setattr(push, name, _render(f"push.{name}", getattr(push, name), variables))
        for key in list(push.data):
            push.data[key] = _render(f"push.data.{key}", push.data[key], variables)
    elif kind == "email":
        email = out.email
        for name in ("subject", "html", "text", "from_address", "reply_to"):
            setattr(email, name, _render(f"email.{name}", getattr(email, name), variables))
    elif kind == "text":
        text = out.text
        text.text = _render("text.text", text.text, variables)
        for i, value in enumerate(list(text.whatsapp_parameters)):
            text.whatsapp_parameters[i] = _render(
                f"text.whatsapp_parameters[{i}]", value, variables
            )
    elif kind == "webhook":
        hook = out.webhook
        hook.url = _render("webhook.url", hook.url, variables)
        hook.body = _render("webhook.body", hook.body, variables)
        for key in list(hook.headers):
            hook.headers[key] = _render(f"webhook.headers.{key}", hook.headers[key], variables)
    elif kind == "in_app":
        in_app = out.in_app
        in_app.title = _render("in_app.title", in_app.title, variables)
        in_app.body = _render("in_app.body", in_app.body, variables)
        for i, button in enumerate(in_app.buttons):
            button.label = _render(f"in_app.buttons[{i}].label", button.label, variables)
            button.url = _render(f"in_app.buttons[{i}].url", button.url, variables)
    return out


def _attribute(value: user_pb2.AttributeValue) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() else number
    if kind == "bool_value":
        return value.bool_value
    if kind == "timestamp_value":
        return value.timestamp_value.ToJsonString()
    return None


def user_variables(user: user_pb2.User) -> dict[str, Any]:
    """The ``user`` variable of a profile: standard fields that are set, and attributes.

    Unset standard fields are left out, so ``{{ user.first_name }}`` on a profile without one is
    a missing variable (strict), and ``| default:`` supplies a fallback.
    """
    variables: dict[str, Any] = {"user_id": user.user_id}
    for name in (
        "external_id",
        "first_name",
        "last_name",
        "email",
        "phone",
        "timezone",
        "language",
        "country",
    ):
        value = getattr(user, name)
        if value:
            variables[name] = value
    if user.HasField("birthdate"):
        date = user.birthdate
        variables["birthdate"] = f"{date.year:04d}-{date.month:02d}-{date.day:02d}"
    variables["attributes"] = {
        name: converted
        for name, value in user.attributes.items()
        if (converted := _attribute(value)) is not None
    }
    return variables


def struct_variables(struct: struct_pb2.Struct | None) -> dict[str, Any]:
    """A protobuf Struct as plain Python values (numbers that are whole become ints)."""
    if struct is None:
        return {}
    values: dict[str, Any] = _whole_numbers(json_format.MessageToDict(struct))
    return values


def _whole_numbers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _whole_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(item) for item in value]
    return value


@dataclass(frozen=True, slots=True)
class RenderContext:
    """Everything but the user: what a send gives a template."""

    data: dict[str, Any]
    event: dict[str, Any]
    journey: dict[str, Any]
    message: dict[str, Any]

    def variables(self, user: user_pb2.User) -> dict[str, Any]:
        """The full variable set for ``user``."""
        return {
            "user": user_variables(user),
            "data": self.data,
            "event": self.event,
            "journey": self.journey,
            "message": self.message,
        }
