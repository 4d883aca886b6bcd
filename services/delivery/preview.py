"""RenderPreview: what a user would receive from a template (or inline content), now.

Uses the same pieces as the worker (the profile from identity, locale choice, Liquid with strict
variables) but sends nothing and rewrites no links. A render error is an answer, not a failure
of the call: the response carries it as a status with reason RENDER_FAILED.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from google.rpc import code_pb2, error_details_pb2, status_pb2
from tidings.delivery.v1 import delivery_service_pb2, template_pb2

from services.delivery import channels
from services.delivery.identity_client import IdentityClient
from services.delivery.render import RenderContext, RenderError, render_content, struct_variables
from services.delivery.templates import choose_content, get_template
from services.delivery.validation import check_locale, check_option, check_ref
from services.runtime.errors import FieldViolations

__all__ = ["render_preview"]


async def render_preview(
    pool: asyncpg.Pool,
    identity: IdentityClient,
    app_id: str,
    request: delivery_service_pb2.RenderPreviewRequest,
) -> delivery_service_pb2.RenderPreviewResponse:
    """Render for one user.

    Raises:
        InvalidArgument: Bad ref, option or locale.
        NotFound: No such template or user.
    """
    violations = FieldViolations()
    check_ref(violations, "user", request.user)
    check_option(violations, "option", request.option)
    if request.spec.locale:
        check_locale(violations, "spec.locale", request.spec.locale)
    violations.raise_if_any()
    option = request.option
    response = delivery_service_pb2.RenderPreviewResponse()
    template: template_pb2.Template | None = None
    if option.template_id:
        template = await get_template(pool, app_id, option.template_id, option.template_version)
        response.template_version = template.version
    user = await identity.get_user(app_id, request.user)
    if template is not None:
        content, locale = choose_content(template, request.spec.locale or user.language)
        response.locale = locale
        channel = channels.channel_name(template.channel) or ""
    else:
        content = option.content
        channel = channels.channel_name(option.channel) or ""
    spec = request.spec
    context = RenderContext(
        data=struct_variables(spec.data),
        event=struct_variables(spec.event_properties),
        journey=struct_variables(spec.journey),
        message={
            "message_id": "preview",
            "channel": channel,
            "broadcast_id": "",
            "requested_at_ms": 0,
        },
    )
    variables: dict[str, Any] = context.variables(user)
    try:
        response.content.CopyFrom(render_content(content, variables))
    except RenderError as exc:
        status = status_pb2.Status(
            code=code_pb2.FAILED_PRECONDITION, message=f"cannot render: {exc}"
        )
        info = error_details_pb2.ErrorInfo(reason="RENDER_FAILED", domain="delivery")
        info.metadata["field"] = exc.field
        status.details.add().Pack(info)
        bad = error_details_pb2.BadRequest()
        bad.field_violations.add(field=exc.field, description=exc.detail)
        status.details.add().Pack(bad)
        response.error.CopyFrom(status)
    return response
