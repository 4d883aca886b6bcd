"""Templates through the API: validation with field paths, versions, app isolation, preview."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2
from tidings.delivery.v1 import channel_pb2, message_pb2, template_pb2
from tidings.delivery.v1 import delivery_service_pb2 as dpb

from tests.delivery.support import DeliveryHarness, by_id, struct
from tests.identity.support import failure

PUSH = channel_pb2.CHANNEL_PUSH


def _push(body: str, title: str = "") -> template_pb2.MessageContent:
    return template_pb2.MessageContent(push=template_pb2.PushContent(title=title, body=body))


def _template(
    name: str = "welcome", body: str = "Hi {{ user.first_name }}"
) -> template_pb2.Template:
    template = template_pb2.Template(display_name=name, channel=PUSH, content=_push(body))
    template.locales["es"].CopyFrom(_push("Hola {{ user.first_name }}"))
    return template


async def _create(
    harness: DeliveryHarness, template: template_pb2.Template
) -> template_pb2.Template:
    return await harness.delivery.CreateTemplate(  # type: ignore[no-any-return]
        dpb.CreateTemplateRequest(template=template), metadata=harness.server
    )


async def test_create_get_update_makes_versions(harness: DeliveryHarness) -> None:
    created = await _create(harness, _template())
    assert created.version == 1
    assert created.locales["es"].push.body == "Hola {{ user.first_name }}"
    updated = await harness.delivery.UpdateTemplate(
        dpb.UpdateTemplateRequest(
            template=template_pb2.Template(
                template_id=created.template_id, content=_push("Hello {{ user.first_name }}")
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["content"]),
        ),
        metadata=harness.server,
    )
    assert updated.version == 2
    assert updated.display_name == "welcome"
    assert updated.locales["es"].push.body == "Hola {{ user.first_name }}"  # not in the mask
    first = await harness.delivery.GetTemplate(
        dpb.GetTemplateRequest(template_id=created.template_id, version=1), metadata=harness.server
    )
    assert first.content.push.body == "Hi {{ user.first_name }}"
    latest = await harness.delivery.GetTemplate(
        dpb.GetTemplateRequest(template_id=created.template_id), metadata=harness.server
    )
    assert latest.content.push.body == "Hello {{ user.first_name }}"
    versions = await harness.delivery.ListTemplateVersions(
        dpb.ListTemplateVersionsRequest(template_id=created.template_id), metadata=harness.server
    )
    assert [t.version for t in versions.templates] == [2, 1]


async def test_list_pages_by_name(harness: DeliveryHarness) -> None:
    for name in ("c", "a", "b"):
        await _create(harness, _template(name))
    first = await harness.delivery.ListTemplates(
        dpb.ListTemplatesRequest(page_size=2), metadata=harness.server
    )
    assert [t.display_name for t in first.templates] == ["a", "b"]
    second = await harness.delivery.ListTemplates(
        dpb.ListTemplatesRequest(page_size=2, page_token=first.next_page_token),
        metadata=harness.server,
    )
    assert [t.display_name for t in second.templates] == ["c"]
    assert not second.next_page_token


@pytest.mark.parametrize(
    ("template", "fields"),
    [
        (template_pb2.Template(channel=PUSH, content=_push("x")), ["template.display_name"]),
        (template_pb2.Template(display_name="n", content=_push("x")), ["template.channel"]),
        (
            template_pb2.Template(display_name="n", channel=PUSH, content=_push("")),
            ["template.content.push.body"],
        ),
        (
            template_pb2.Template(display_name="n", channel=PUSH, content=_push("{{ oops")),
            ["template.content.push.body"],
        ),
        (
            template_pb2.Template(
                display_name="n",
                channel=channel_pb2.CHANNEL_EMAIL,
                content=template_pb2.MessageContent(email=template_pb2.EmailContent()),
            ),
            ["template.content.email.subject", "template.content.email.html"],
        ),
        (
            template_pb2.Template(
                display_name="n", channel=channel_pb2.CHANNEL_EMAIL, content=_push("x")
            ),
            ["template.content.push"],
        ),
        (
            template_pb2.Template(
                display_name="n",
                channel=channel_pb2.CHANNEL_WEBHOOK,
                content=template_pb2.MessageContent(
                    webhook=template_pb2.WebhookContent(url="ftp://x", method="BREW")
                ),
            ),
            ["template.content.webhook.url", "template.content.webhook.method"],
        ),
    ],
)
async def test_invalid_templates_name_their_fields(
    harness: DeliveryHarness, template: template_pb2.Template, fields: list[str]
) -> None:
    failed = await failure(_create(harness, template))
    assert failed.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.fields == fields


async def test_bad_locale_key_is_refused(harness: DeliveryHarness) -> None:
    template = _template()
    template.locales["not a locale"].CopyFrom(_push("x"))
    failed = await failure(_create(harness, template))
    assert failed.fields == ["template.locales['not a locale']"]


async def test_names_are_unique_per_app(harness: DeliveryHarness) -> None:
    await _create(harness, _template("same"))
    failed = await failure(_create(harness, _template("same")))
    assert (failed.code, failed.reason) == (grpc.StatusCode.ALREADY_EXISTS, "TEMPLATE_NAME_TAKEN")


async def test_another_apps_template_is_not_found(
    harness: DeliveryHarness, apps_stub: object
) -> None:
    from tests.identity.conftest import create_test_app

    created = await _create(harness, _template())
    other = await create_test_app(apps_stub)  # type: ignore[arg-type]
    for call in (
        harness.delivery.GetTemplate(
            dpb.GetTemplateRequest(template_id=created.template_id), metadata=other.server
        ),
        harness.delivery.DeleteTemplate(
            dpb.DeleteTemplateRequest(template_id=created.template_id), metadata=other.server
        ),
    ):
        failed = await failure(call)
        assert (failed.code, failed.reason) == (grpc.StatusCode.NOT_FOUND, "TEMPLATE_NOT_FOUND")


async def test_delete_removes_every_version(harness: DeliveryHarness) -> None:
    created = await _create(harness, _template())
    await harness.delivery.DeleteTemplate(
        dpb.DeleteTemplateRequest(template_id=created.template_id), metadata=harness.server
    )
    failed = await failure(
        harness.delivery.GetTemplate(
            dpb.GetTemplateRequest(template_id=created.template_id, version=1),
            metadata=harness.server,
        )
    )
    assert failed.code == grpc.StatusCode.NOT_FOUND


async def test_preview_renders_for_the_user_in_their_language(harness: DeliveryHarness) -> None:
    created = await _create(harness, _template())
    spanish = await harness.user(first_name="Lucía", language="es")
    preview = await harness.delivery.RenderPreview(
        dpb.RenderPreviewRequest(
            user=by_id(spanish.user_id),
            option=message_pb2.SendOption(template_id=created.template_id),
        ),
        metadata=harness.server,
    )
    assert (preview.content.push.body, preview.locale, preview.template_version) == (
        "Hola Lucía",
        "es",
        1,
    )


async def test_preview_reports_a_missing_variable(harness: DeliveryHarness) -> None:
    nameless = await harness.user()
    preview = await harness.delivery.RenderPreview(
        dpb.RenderPreviewRequest(
            user=by_id(nameless.user_id),
            option=message_pb2.SendOption(
                channel=PUSH, content=_push("Hi {{ user.first_name }} {{ data.code }}")
            ),
            spec=message_pb2.MessageSpec(data=struct({"code": "X"})),
        ),
        metadata=harness.server,
    )
    assert not preview.HasField("content")
    assert "user.first_name" in preview.error.message
