"""gRPC surface of the delivery service: protobuf in, a domain call, protobuf out.

Also wires the process: the authenticator (app keys checked by identity), the provider adapters,
and the background tasks (the workers' consumer, the scheduler, the broadcast fan-out and the
tracking endpoint), each switchable by a setting so a deployment can run them apart.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc.aio
from google.protobuf import duration_pb2, empty_pb2
from google.type import timeofday_pb2
from tidings.delivery.v1 import (
    broadcast_pb2,
    channel_pb2,
    delivery_service_pb2,
    delivery_service_pb2_grpc,
    message_pb2,
    template_pb2,
)
from tidings.identity.v1 import user_ref_pb2

from services.delivery import (
    app_settings,
    broadcasts,
    channel_configs,
    in_app,
    messages,
    sends,
    templates,
)
from services.delivery.access import client_or_server_app, server_app
from services.delivery.broadcasts import FanOut
from services.delivery.consumer import run_worker
from services.delivery.erasure import run_erasure_consumer
from services.delivery.identity_client import IdentityClient
from services.delivery.preview import render_preview
from services.delivery.providers.registry import Adapters, load_adapters
from services.delivery.reports_http import ProviderReports
from services.delivery.scheduler import run_scheduler
from services.delivery.secrets_box import SecretBox
from services.delivery.settings import DeliverySettings
from services.delivery.tracking import TrackingLinks
from services.delivery.tracking_http import TrackingServer
from services.delivery.validation import check_frequency_cap, check_ref, check_timezone
from services.delivery.worker import Worker
from services.runtime import service_keys
from services.runtime.app import ServiceContext, ServiceSpec
from services.runtime.errors import FieldViolations, NotFound
from services.runtime.key_rotation import run_key_rotation
from services.runtime.remote_auth import RemoteKeyAuthenticator

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

DELIVERY_SERVICE = delivery_service_pb2.DESCRIPTOR.services_by_name["DeliveryService"].full_name

_Context = grpc.aio.ServicerContext[Any, Any]
_SETTINGS_PATHS = frozenset({"frequency_cap", "quiet_hours", "default_timezone"})


@dataclass
class Parts:
    """What the servicer and the background tasks of one process share."""

    settings: DeliverySettings
    box: SecretBox
    links: TrackingLinks
    identity: IdentityClient
    adapters: Adapters
    wake_fan_out: asyncio.Event


def _minutes(time_of_day: timeofday_pb2.TimeOfDay) -> int:
    return int(time_of_day.hours) * 60 + int(time_of_day.minutes)


def _settings_out(settings: app_settings.AppSettings) -> message_pb2.DeliverySettings:
    out = message_pb2.DeliverySettings(default_timezone=settings.default_timezone)
    out.frequency_cap.max_messages = settings.cap_max
    out.frequency_cap.window.CopyFrom(duration_pb2.Duration(seconds=settings.cap_window_seconds))
    out.frequency_cap.action = (
        message_pb2.FrequencyCap.ACTION_DEFER
        if settings.cap_action == "defer"
        else message_pb2.FrequencyCap.ACTION_DROP
    )
    out.quiet_hours.enabled = settings.quiet_enabled
    out.quiet_hours.start_time.CopyFrom(
        timeofday_pb2.TimeOfDay(hours=settings.quiet_start // 60, minutes=settings.quiet_start % 60)
    )
    out.quiet_hours.end_time.CopyFrom(
        timeofday_pb2.TimeOfDay(hours=settings.quiet_end // 60, minutes=settings.quiet_end % 60)
    )
    if settings.update_time is not None:
        out.update_time.FromDatetime(settings.update_time)
    return out


def _check_time_of_day(violations: FieldViolations, field: str, value: Any) -> None:
    if not (0 <= value.hours <= 23 and 0 <= value.minutes <= 59) or value.seconds or value.nanos:
        violations.add(field, "a time of day with hours 0-23 and minutes 0-59")


class DeliveryServicer(delivery_service_pb2_grpc.DeliveryServiceServicer):
    """``tidings.delivery.v1.DeliveryService``: templates, channels, sends, broadcasts, messages."""

    def __init__(self, ctx: ServiceContext, parts: Parts) -> None:
        self._ctx = ctx
        self._parts = parts

    # --- templates -------------------------------------------------------------------------

    async def CreateTemplate(
        self, request: delivery_service_pb2.CreateTemplateRequest, context: _Context
    ) -> template_pb2.Template:
        """Create a template (version 1)."""
        caller = server_app()
        return await templates.create_template(
            self._ctx.pool, caller.app_id, request.template, self._ctx.clock()
        )

    async def GetTemplate(
        self, request: delivery_service_pb2.GetTemplateRequest, context: _Context
    ) -> template_pb2.Template:
        """Return a template (a version)."""
        caller = server_app()
        return await templates.get_template(
            self._ctx.pool, caller.app_id, request.template_id, request.version
        )

    async def ListTemplates(
        self, request: delivery_service_pb2.ListTemplatesRequest, context: _Context
    ) -> delivery_service_pb2.ListTemplatesResponse:
        """List the app's templates by name."""
        caller = server_app()
        page = await templates.list_templates(
            self._ctx.pool,
            caller.app_id,
            page_size=request.page_size,
            page_token=request.page_token,
            channel=request.channel,
        )
        return delivery_service_pb2.ListTemplatesResponse(
            templates=page.templates, next_page_token=page.next_page_token
        )

    async def UpdateTemplate(
        self, request: delivery_service_pb2.UpdateTemplateRequest, context: _Context
    ) -> template_pb2.Template:
        """Change a template: a new version."""
        caller = server_app()
        return await templates.update_template(
            self._ctx.pool,
            caller.app_id,
            request.template,
            list(request.update_mask.paths),
            self._ctx.clock(),
        )

    async def DeleteTemplate(
        self, request: delivery_service_pb2.DeleteTemplateRequest, context: _Context
    ) -> empty_pb2.Empty:
        """Delete a template and its versions."""
        caller = server_app()
        await templates.delete_template(self._ctx.pool, caller.app_id, request.template_id)
        return empty_pb2.Empty()

    async def ListTemplateVersions(
        self, request: delivery_service_pb2.ListTemplateVersionsRequest, context: _Context
    ) -> delivery_service_pb2.ListTemplateVersionsResponse:
        """List a template's versions, newest first."""
        caller = server_app()
        page = await templates.list_template_versions(
            self._ctx.pool,
            caller.app_id,
            request.template_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return delivery_service_pb2.ListTemplateVersionsResponse(
            templates=page.templates, next_page_token=page.next_page_token
        )

    async def RenderPreview(
        self, request: delivery_service_pb2.RenderPreviewRequest, context: _Context
    ) -> delivery_service_pb2.RenderPreviewResponse:
        """Render a template for one user."""
        caller = server_app()
        return await render_preview(self._ctx.pool, self._parts.identity, caller.app_id, request)

    # --- channels and settings -------------------------------------------------------------

    async def UpdateChannelConfig(
        self, request: delivery_service_pb2.UpdateChannelConfigRequest, context: _Context
    ) -> channel_pb2.ChannelConfig:
        """Create or change a channel's configuration."""
        caller = server_app()
        config = await channel_configs.update_config(
            self._ctx.pool,
            self._parts.box,
            self._parts.adapters,
            caller.app_id,
            request.channel_config,
            list(request.update_mask.paths),
            self._ctx.clock(),
        )
        return config.to_proto()

    async def GetChannelConfig(
        self, request: delivery_service_pb2.GetChannelConfigRequest, context: _Context
    ) -> channel_pb2.ChannelConfig:
        """Return a channel's configuration (no credentials)."""
        caller = server_app()
        config = await channel_configs.get_config(
            self._ctx.pool, self._parts.box, caller.app_id, request.channel
        )
        return config.to_proto()

    async def ListChannelConfigs(
        self, request: delivery_service_pb2.ListChannelConfigsRequest, context: _Context
    ) -> delivery_service_pb2.ListChannelConfigsResponse:
        """List the app's configured channels."""
        caller = server_app()
        configs = await channel_configs.list_configs(self._ctx.pool, self._parts.box, caller.app_id)
        return delivery_service_pb2.ListChannelConfigsResponse(
            channel_configs=[config.to_proto() for config in configs]
        )

    async def DeleteChannelConfig(
        self, request: delivery_service_pb2.DeleteChannelConfigRequest, context: _Context
    ) -> empty_pb2.Empty:
        """Remove a channel's configuration."""
        caller = server_app()
        await channel_configs.delete_config(self._ctx.pool, caller.app_id, request.channel)
        return empty_pb2.Empty()

    async def GetDeliverySettings(
        self, request: delivery_service_pb2.GetDeliverySettingsRequest, context: _Context
    ) -> message_pb2.DeliverySettings:
        """Return the app's delivery settings."""
        caller = server_app()
        async with self._ctx.pool.acquire() as conn:
            return _settings_out(await app_settings.get_settings(conn, caller.app_id))

    async def UpdateDeliverySettings(
        self, request: delivery_service_pb2.UpdateDeliverySettingsRequest, context: _Context
    ) -> message_pb2.DeliverySettings:
        """Change the app's delivery settings."""
        caller = server_app()
        wanted = request.settings
        violations = FieldViolations()
        paths = set(request.update_mask.paths)
        for path in paths - _SETTINGS_PATHS:
            violations.add("update_mask", f"{path!r} cannot be updated")
        paths = paths or set(_SETTINGS_PATHS)
        if "frequency_cap" in paths:
            check_frequency_cap(violations, "settings.frequency_cap", wanted.frequency_cap)
        if "quiet_hours" in paths:
            quiet = wanted.quiet_hours
            _check_time_of_day(violations, "settings.quiet_hours.start_time", quiet.start_time)
            _check_time_of_day(violations, "settings.quiet_hours.end_time", quiet.end_time)
        if "default_timezone" in paths:
            check_timezone(violations, "settings.default_timezone", wanted.default_timezone)
        violations.raise_if_any()
        async with self._ctx.pool.acquire() as conn, conn.transaction():
            current = await app_settings.get_settings(conn, caller.app_id)
            values: dict[str, object] = {}
            if "frequency_cap" in paths:
                cap = wanted.frequency_cap
                values.update(
                    cap_max=cap.max_messages,
                    cap_window_seconds=int(cap.window.seconds) if cap.max_messages else 0,
                    cap_action="defer"
                    if cap.action == message_pb2.FrequencyCap.ACTION_DEFER
                    else "drop",
                )
            if "quiet_hours" in paths:
                quiet = wanted.quiet_hours
                values.update(
                    quiet_enabled=quiet.enabled,
                    quiet_start=_minutes(quiet.start_time),
                    quiet_end=_minutes(quiet.end_time),
                )
            if "default_timezone" in paths:
                values["default_timezone"] = wanted.default_timezone
            saved = await app_settings.save_settings(conn, current.with_values(**values))
        return _settings_out(saved)

    # --- sending ---------------------------------------------------------------------------

    async def Send(
        self, request: delivery_service_pb2.SendRequest, context: _Context
    ) -> delivery_service_pb2.SendResponse:
        """Send to a few users, idempotently."""
        caller = server_app()
        return await sends.send(self._ctx.pool, caller.app_id, request, self._ctx.clock())

    async def Broadcast(
        self, request: delivery_service_pb2.BroadcastRequest, context: _Context
    ) -> broadcast_pb2.Broadcast:
        """Start a broadcast to all users, a segment or a list."""
        caller = server_app()
        return await broadcasts.create_broadcast(
            self._ctx, caller.app_id, request, self._parts.wake_fan_out
        )

    async def BroadcastCsv(
        self,
        request_iterator: AsyncIterator[delivery_service_pb2.BroadcastCsvRequest],
        context: _Context,
    ) -> broadcast_pb2.Broadcast:
        """Broadcast to the users of an uploaded CSV file."""
        caller = server_app()
        return await broadcasts.broadcast_csv(
            self._ctx, caller.app_id, request_iterator, self._parts.identity
        )

    async def GetBroadcast(
        self, request: delivery_service_pb2.GetBroadcastRequest, context: _Context
    ) -> broadcast_pb2.Broadcast:
        """Return a broadcast with its counts."""
        caller = server_app()
        return await broadcasts.get_broadcast(self._ctx.pool, caller.app_id, request.broadcast_id)

    async def ListBroadcasts(
        self, request: delivery_service_pb2.ListBroadcastsRequest, context: _Context
    ) -> delivery_service_pb2.ListBroadcastsResponse:
        """List the app's broadcasts."""
        caller = server_app()
        return await broadcasts.list_broadcasts(
            self._ctx.pool,
            caller.app_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )

    async def CancelBroadcast(
        self, request: delivery_service_pb2.CancelBroadcastRequest, context: _Context
    ) -> broadcast_pb2.Broadcast:
        """Cancel a broadcast."""
        caller = server_app()
        return await broadcasts.cancel_broadcast(
            self._ctx.pool, caller.app_id, request.broadcast_id, self._ctx.clock()
        )

    # --- messages --------------------------------------------------------------------------

    async def GetMessage(
        self, request: delivery_service_pb2.GetMessageRequest, context: _Context
    ) -> message_pb2.Message:
        """Return a message and its timeline."""
        caller = server_app()
        return await messages.get_message(self._ctx.pool, caller.app_id, request.message_id)

    async def ListMessages(
        self, request: delivery_service_pb2.ListMessagesRequest, context: _Context
    ) -> delivery_service_pb2.ListMessagesResponse:
        """List a user's messages."""
        caller = server_app()
        violations = FieldViolations()
        check_ref(violations, "user", request.user)
        violations.raise_if_any()
        # Resolved even for a user_id ref: an id of another app (or of no one) is NOT_FOUND.
        user_id = (await self._parts.identity.get_user(caller.app_id, request.user)).user_id
        return await messages.list_messages(
            self._ctx.pool,
            caller.app_id,
            user_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )

    async def ReportEngagement(
        self, request: delivery_service_pb2.ReportEngagementRequest, context: _Context
    ) -> delivery_service_pb2.ReportEngagementResponse:
        """Record an open or click reported by an SDK."""
        caller = client_or_server_app()
        message_id, status, at = messages.check_engagement(request, self._ctx.clock())
        new = await messages.engage(
            self._ctx.pool,
            caller.app_id,
            message_id,
            status,
            at,
            subscription_id=request.subscription_id,
            url=request.url,
        )
        return delivery_service_pb2.ReportEngagementResponse(status=new)  # type: ignore[arg-type]

    async def ListInAppMessages(
        self, request: delivery_service_pb2.ListInAppMessagesRequest, context: _Context
    ) -> delivery_service_pb2.ListInAppMessagesResponse:
        """The in-app messages waiting for the caller's subscription."""
        caller = client_or_server_app()
        response = await in_app.list_in_app(
            self._ctx.pool, caller.app_id, request, self._ctx.clock()
        )
        if not response.messages:
            # Nothing waiting, or no such subscription in this app: only identity can tell.
            ref = user_ref_pb2.UserRef(subscription_id=request.subscription_id)
            try:
                await self._parts.identity.get_user(caller.app_id, ref)
            except NotFound:
                raise NotFound("subscription not found", reason="SUBSCRIPTION_NOT_FOUND") from None
        return response


def register(server: grpc.aio.Server, ctx: ServiceContext, *, parts: Parts) -> list[str]:
    """Add delivery's servicer to ``server``; returns its full service name."""
    delivery_service_pb2_grpc.add_DeliveryServiceServicer_to_server(
        DeliveryServicer(ctx, parts), server
    )
    return [DELIVERY_SERVICE]


async def _worker_task(ctx: ServiceContext, *, parts: Parts) -> None:
    worker = Worker(ctx, parts.settings, parts.identity, parts.adapters, parts.box, parts.links)
    try:
        await run_worker(ctx, worker)
    finally:
        await worker.close()


async def _fan_out_task(ctx: ServiceContext, *, parts: Parts) -> None:
    await FanOut(ctx, parts.identity, parts.wake_fan_out).run()


async def _tracking_task(ctx: ServiceContext, *, parts: Parts) -> None:
    reports = ProviderReports(
        ctx, parts.links, parts.box, parts.identity, parts.settings.tracking_base_url
    )
    server = TrackingServer(ctx, parts.links, parts.identity, reports)
    await server.run(parts.settings.tracking_host, parts.settings.tracking_port)


def spec(settings: DeliverySettings | None = None) -> ServiceSpec:
    """The delivery service for the runtime; settings are read from the environment by default."""
    settings = settings or DeliverySettings()
    box = SecretBox(settings.delivery_secret_key)
    parts = Parts(
        settings=settings,
        box=box,
        links=TrackingLinks(box, settings.tracking_base_url),
        identity=IdentityClient(
            settings.identity_target, settings.admin_key, lambda: context_pool(), box
        ),
        adapters=load_adapters(settings),
        wake_fan_out=asyncio.Event(),
    )
    holder: dict[str, ServiceContext] = {}

    def context_pool() -> Any:
        return holder["ctx"].pool

    def registering(server: grpc.aio.Server, ctx: ServiceContext) -> list[str]:
        holder["ctx"] = ctx
        return register(server, ctx, parts=parts)

    background: list[Any] = [
        functools.partial(_tracking_task, parts=parts),
        functools.partial(
            run_key_rotation, box=box, columns=[channel_configs.SEALED, service_keys.SEALED]
        ),
    ]
    if settings.run_worker:
        background.append(functools.partial(_worker_task, parts=parts))
        background.append(run_erasure_consumer)
    if settings.run_scheduler:
        background.append(run_scheduler)
    if settings.run_fanout:
        background.append(functools.partial(_fan_out_task, parts=parts))
    return ServiceSpec(
        name="delivery",
        settings=settings,
        migrations_dir=MIGRATIONS_DIR,
        register=registering,
        authenticator=lambda ctx: RemoteKeyAuthenticator(
            settings.identity_target,
            settings.admin_key,
            cache_seconds=settings.auth_cache_seconds,
        ),
        background=background,
    )
