"""Liquid rendering (pure): strict variables, defaults, the variables a template sees, locales."""

from __future__ import annotations

import pytest
from google.protobuf import timestamp_pb2
from tidings.delivery.v1 import template_pb2
from tidings.identity.v1 import user_pb2

from services.delivery.render import RenderContext, RenderError, compile_problem, render_content
from services.delivery.templates import choose_content


def _user() -> user_pb2.User:
    user = user_pb2.User(user_id="u1", external_id="crm-1", first_name="Ana", language="pt-BR")
    user.attributes["plan"].string_value = "gold"
    user.attributes["visits"].number_value = 3
    stamp = timestamp_pb2.Timestamp(seconds=0)
    user.attributes["since"].timestamp_value.CopyFrom(stamp)
    return user


def _context(**data: object) -> RenderContext:
    return RenderContext(
        data=dict(data), event={"sku": "A-1"}, journey={"journey_id": "j1"}, message={"id": "m"}
    )


def _push(body: str, title: str = "") -> template_pb2.MessageContent:
    return template_pb2.MessageContent(push=template_pb2.PushContent(title=title, body=body))


def test_profile_event_journey_and_data_are_variables() -> None:
    content = _push(
        "{{ user.first_name }} {{ user.attributes.plan }} x{{ user.attributes.visits }} "
        "{{ event.sku }} {{ journey.journey_id }} {{ data.code }}"
    )
    out = render_content(content, _context(code="SAVE10").variables(_user()))
    assert out.push.body == "Ana gold x3 A-1 j1 SAVE10"


def test_a_missing_variable_fails_the_message_naming_it() -> None:
    with pytest.raises(RenderError) as caught:
        render_content(_push("Hi {{ user.last_name }}"), _context().variables(_user()))
    assert caught.value.field == "push.body"
    assert "user.last_name" in caught.value.detail


def test_default_supplies_a_missing_variable() -> None:
    content = _push(
        "Hi {{ user.last_name | default: 'friend' }}", title="{{ data.x | default: 1 }}"
    )
    out = render_content(content, _context().variables(_user()))
    assert (out.push.body, out.push.title) == ("Hi friend", "1")


def test_syntax_errors_are_found_when_saving() -> None:
    assert compile_problem("{{ user.first_name ") is not None
    assert compile_problem("{% if x %}no end") is not None
    assert compile_problem("plain text") is None
    assert compile_problem("{{ user.first_name | upcase }}") is None


def test_unknown_filter_fails_rendering() -> None:
    with pytest.raises(RenderError, match="nosuchfilter"):
        render_content(_push("{{ user.first_name | nosuchfilter }}"), _context().variables(_user()))


def test_runaway_loops_fail_instead_of_hanging() -> None:
    content = _push("{% for i in (1..100000000) %}x{% endfor %}")
    with pytest.raises(RenderError):
        render_content(content, _context().variables(_user()))


def test_locale_variant_exact_then_language_then_default() -> None:
    template = template_pb2.Template(content=_push("hello"))
    template.locales["pt"].CopyFrom(_push("olá"))
    template.locales["es-MX"].CopyFrom(_push("hola güey"))
    assert choose_content(template, "pt-BR") == (template.locales["pt"], "pt")
    assert choose_content(template, "es-mx")[1] == "es-MX"
    assert choose_content(template, "es")[1] == ""
    assert choose_content(template, "")[0].push.body == "hello"


_VARIABLES = {
    "user": {"first_name": "Ana", "void": "", "visits": 3, "attributes": {"plan": "gold"}},
    "data": {
        "n": 0,
        "ratio": 1.5,
        "flag": False,
        "none": None,
        "items": ["a", "b"],
        "nested": {"k": "v"},
        "hollow": "",
        "html": "<b>&</b>",
    },
}


@pytest.mark.parametrize(
    "source",
    [
        "Hi {{ user.first_name }}!",
        "{{user.first_name}}{{ user.visits }}",
        "{{ user.nickname | default: 'there' }}",
        '{{ user.nickname | default: "there" }} and {{ user.void | default: "x" }}',
        "{{ user.attributes.plan }} {{ data.n }} {{ data.n | default: 'zero' }}",
        "{{ data.ratio }} {{ data.flag }} {{ data.flag | default: 'no' }}",
        "{{ data.none | default: 'nil' }} {{ data.items }} {{ data.items.size }}",
        "{{ data.items.first | default: 'x' }} {{ data.nested | default: 'x' }}",
        "{{ data.nested.size | default: 'x' }} {{ data.html }}",
        "{{ true | default: 'x' }} {{ nil | default: 'x' }}",
        "{{ user.first_name | upcase }}",
        "{% if user.first_name %}yes{% endif %} {{ user.first_name }}",
        "{{ user.first_name.size }} {{ data.hollow | default: 'b' }}",
        "{{ data.missing | default: 'a' }}{{ user.first_name | default: '' }}",
    ],
)
def test_simple_outputs_render_exactly_as_liquid(source: str) -> None:
    """The substitution fast path never answers differently from Liquid itself."""
    from services.delivery import render

    expected = render._ENV.env.from_string(source).render(**_VARIABLES)
    assert render._render("f", source, _VARIABLES) == expected


def test_a_missing_variable_without_default_fails_on_the_fast_path_too() -> None:
    from services.delivery import render

    with pytest.raises(RenderError, match=r"user\.nickname"):
        render._render("push.body", "Hi {{ user.nickname }}", _VARIABLES)
    with pytest.raises(RenderError):
        render._render("push.body", "Hi {{ user.first_name ", _VARIABLES)


MARKUP = '<a href="https://evil.example/login">Verify</a>'


def test_variables_in_email_html_are_escaped_and_elsewhere_are_not() -> None:
    # A profile value is text: in an email's HTML it must not become a (tracked) link.
    content = template_pb2.MessageContent(
        email=template_pb2.EmailContent(
            subject="Hi {{ user.first_name }}",
            html=(
                '<p style="x">Hi {{ user.first_name }}</p>'  # the fast path
                "<p>{{ user.first_name | upcase }}</p>"  # Liquid
                "<p>{{ user.nickname | default: '<b>friend</b>' }}</p>"  # the author's text
                "<div>{{ data.block | safe }}</div>"  # HTML on purpose
            ),
            text="Hi {{ user.first_name }}",
        )
    )
    rendered = render_content(
        content, {"user": {"first_name": MARKUP}, "data": {"block": "<hr>"}}
    ).email
    escaped = "&lt;a href=&#34;https://evil.example/login&#34;&gt;Verify&lt;/a&gt;"
    assert rendered.html == (
        f'<p style="x">Hi {escaped}</p>'
        "<p>&lt;A HREF=&#34;HTTPS://EVIL.EXAMPLE/LOGIN&#34;&gt;VERIFY&lt;/A&gt;</p>"
        "<p><b>friend</b></p>"
        "<div><hr></div>"
    )
    assert rendered.subject == rendered.text == f"Hi {MARKUP}"
