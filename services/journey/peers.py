"""Journey's calls to identity and delivery, and the credentials they are made with.

Background work (the engine, the consumers) has no caller whose key it could forward, so each
app's calls are made with a server key of that app that journey holds itself, as delivery does
(:mod:`services.runtime.service_keys`): minted with the admin key the first time the app needs
it (display name ``tidings-journey``), stored sealed under ``TIDINGS_JOURNEY_SECRET_KEY`` in
``identity_keys``, cached, and minted again once if the app revoked it. Identity or delivery
down, or no key to be had, is :class:`PeerUnavailable`: the work waits and is retried. A
refusal of the request itself is :class:`PeerRefused`, including RESOURCE_EXHAUSTED when the
peer names the limit (identity's ``ATTRIBUTE_LIMIT``, ``ALIAS_LIMIT``: the same request would
hit it again); a RESOURCE_EXHAUSTED without a reason (the transport's, a proxy's) may pass.

An app's default time zone (identity's ``AppSettings.default_timezone``, read with GetApp and
the admin key: app keys may not call AppsService) is cached for :data:`ZONE_TTL` seconds, so
it is read once a minute per app and process, not per customer; a change reaches the engine
within that time.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, cast

import asyncpg
import grpc
import grpc.aio
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tidings.delivery.v1 import delivery_service_pb2, delivery_service_pb2_grpc
from tidings.identity.v1 import (
    apps_service_pb2,
    apps_service_pb2_grpc,
    identity_service_pb2_grpc,
    segment_pb2,
    user_pb2,
    user_ref_pb2,
)
from tidings.identity.v1 import identity_service_pb2 as ipb

from services.journey.settings import JourneySettings
from services.runtime.errors import NotFound, Unavailable
from services.runtime.secrets_box import SecretBox
from services.runtime.service_keys import Metadata, ServiceKeys, bearer

__all__ = ["PeerRefused", "PeerUnavailable", "Peers"]

#: Seconds one call to a peer may take.
_TIMEOUT = 10.0
_KEY_NAME = "tidings-journey"
_BATCH = 1000
#: Seconds an app's default time zone is kept before it is read again.
ZONE_TTL = 60.0


class PeerUnavailable(Exception):
    """A peer could not answer now (down, or no valid key for the app): retry later."""


class PeerRefused(Exception):
    """A peer refused the request itself (not found, invalid): retrying will not help."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "") -> None:
        super().__init__(f"{code.name}{f' {reason}' if reason else ''}: {message}")
        self.code = code
        self.reason = reason


_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)


def _reason(error: grpc.aio.AioRpcError) -> str:
    """The ``ErrorInfo.reason`` the peer attached, or ``""``."""
    try:
        status = rpc_status.from_call(cast(Any, error))
    except ValueError:  # details that do not match the status: not a peer's own answer
        return ""
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def _translate(error: grpc.aio.AioRpcError) -> Exception:
    code = error.code()
    reason = _reason(error)
    # A named limit (a user's attributes, aliases) is hit again by the same request.
    if code in _TRANSIENT and not (code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason):
        return PeerUnavailable(f"{code.name}: {error.details()}")
    return PeerRefused(code, error.details() or "", reason)


class Peers:
    """Channels to identity and delivery and the per-app keys to call them with.

    Args:
        settings: Where identity and delivery are; the admin key; the key material that seals
            the stored keys.
        pool: Returns the journey database (``identity_keys``); asked per use, since the
            pool exists only once start-up connected it.
    """

    def __init__(self, settings: JourneySettings, pool: Callable[[], asyncpg.Pool]) -> None:
        self._settings = settings
        self._identity: Any = None
        self._apps: Any = None
        self._delivery: Any = None
        self._channels: list[grpc.aio.Channel] = []
        #: Seals the stored keys; the rotation task re-seals them with its newest key.
        self.box = SecretBox(
            settings.journey_secret_key,
            domain="tidings-journey",
            setting="TIDINGS_JOURNEY_SECRET_KEY",
        )
        self._keys = ServiceKeys(
            self._apps_stub, settings.admin_key, pool, self.box, key_name=_KEY_NAME
        )
        #: app -> (default zone, monotonic time it is read again after).
        self._zones: dict[str, tuple[str, float]] = {}

    # -- stubs --------------------------------------------------------------------------------

    def _identity_channel(self) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(self._settings.identity_target)
        self._channels.append(channel)
        self._identity = identity_service_pb2_grpc.IdentityServiceStub(channel)
        self._apps = apps_service_pb2_grpc.AppsServiceStub(channel)
        return channel

    def _identity_stub(self) -> Any:
        if self._identity is None:
            self._identity_channel()
        return self._identity

    def _apps_stub(self) -> Any:
        if self._apps is None:
            self._identity_channel()
        return self._apps

    def _delivery_stub(self) -> Any:
        if self._delivery is None:
            channel = grpc.aio.insecure_channel(self._settings.delivery_target)
            self._channels.append(channel)
            self._delivery = delivery_service_pb2_grpc.DeliveryServiceStub(channel)
        return self._delivery

    async def _call(self, app_id: str, method: Any, request: Any) -> Any:
        async def call(metadata: Metadata) -> Any:
            return await method(request, metadata=metadata, timeout=_TIMEOUT)

        try:
            return await self._keys.as_app(app_id, call)
        except grpc.aio.AioRpcError as error:
            raise _translate(error) from None
        except Unavailable as error:
            raise PeerUnavailable(str(error)) from None
        except NotFound as error:
            raise PeerRefused(grpc.StatusCode.NOT_FOUND, str(error)) from None

    async def close(self) -> None:
        """Close the channels."""
        for channel in self._channels:
            await channel.close(None)
        self._channels.clear()
        self._identity = self._apps = self._delivery = None

    # -- identity -----------------------------------------------------------------------------

    async def default_zone(self, app_id: str) -> str:
        """The app's default IANA time zone for customers without one (``""``: UTC).

        Cached for :data:`ZONE_TTL` seconds. When identity cannot answer, the last value read
        is used while there is one.

        Raises:
            PeerUnavailable: Identity could not answer and the app's zone was never read.
        """
        cached = self._zones.get(app_id)
        if cached is not None and time.monotonic() < cached[1]:
            return cached[0]
        try:
            app = await self._apps_stub().GetApp(
                apps_service_pb2.GetAppRequest(app_id=app_id),
                metadata=bearer(self._settings.admin_key),
                timeout=_TIMEOUT,
            )
        except grpc.aio.AioRpcError as error:
            failure = _translate(error)
            if isinstance(failure, PeerRefused) and failure.code == grpc.StatusCode.NOT_FOUND:
                return ""  # the app is gone: nothing of it is scheduled any more
            if cached is not None:
                return cached[0]
            raise PeerUnavailable(f"the app's time zone: {failure}") from None
        zone = str(app.settings.default_timezone)
        self._zones[app_id] = (zone, time.monotonic() + ZONE_TTL)
        return zone

    async def zone_for(self, app_id: str, user: user_pb2.User | None) -> str:
        """The zone a customer's local times are in: their own, else the app's default."""
        if user is not None and user.timezone:
            return str(user.timezone)
        return await self.default_zone(app_id)

    async def get_users(
        self, app_id: str, user_ids: Iterable[uuid.UUID]
    ) -> dict[uuid.UUID, user_pb2.User]:
        """Whole profiles of ``user_ids`` (missing ones left out)."""
        ids = list(dict.fromkeys(user_ids))
        found: dict[uuid.UUID, user_pb2.User] = {}
        for start in range(0, len(ids), _BATCH):
            chunk = ids[start : start + _BATCH]
            response = await self._call(
                app_id,
                self._identity_stub().BatchGetUsers,
                ipb.BatchGetUsersRequest(
                    refs=[user_ref_pb2.UserRef(user_id=str(u)) for u in chunk]
                ),
            )
            for user_id, result in zip(chunk, response.results, strict=True):
                if result.HasField("user"):
                    found[user_id] = result.user
        return found

    async def resolve(
        self, app_id: str, refs: list[user_ref_pb2.UserRef]
    ) -> list[user_pb2.User | Any]:
        """For each ref: the user, or the per-item ``google.rpc.Status`` identity answered."""
        results: list[user_pb2.User | Any] = []
        for start in range(0, len(refs), _BATCH):
            response = await self._call(
                app_id,
                self._identity_stub().BatchGetUsers,
                ipb.BatchGetUsersRequest(refs=refs[start : start + _BATCH]),
            )
            results.extend(r.user if r.HasField("user") else r.error for r in response.results)
        return results

    async def set_attributes(
        self, app_id: str, user_id: uuid.UUID, attributes: Mapping[str, user_pb2.AttributeValue]
    ) -> None:
        """Write custom attributes of one profile."""
        request = ipb.UpsertUserRequest(ref=user_ref_pb2.UserRef(user_id=str(user_id)))
        for name, value in attributes.items():
            request.user.attributes[name].CopyFrom(value)
            request.update_mask.paths.append(f"attributes.{name}")
        await self._call(app_id, self._identity_stub().UpsertUser, request)

    async def list_users_page(
        self, app_id: str, page_token: str, page_size: int = _BATCH, *, ids_only: bool = False
    ) -> tuple[list[user_pb2.User], str]:
        """One page of the app's users, oldest first, and the next page's token; with
        ``ids_only`` the users carry only their ids (identity loads no profile)."""
        view = ipb.ListUsersRequest.VIEW_IDS if ids_only else ipb.ListUsersRequest.VIEW_FULL
        response = await self._call(
            app_id,
            self._identity_stub().ListUsers,
            ipb.ListUsersRequest(page_size=page_size, page_token=page_token, view=view),
        )
        return list(response.users), str(response.next_page_token)

    async def segment_members(
        self, app_id: str, segment_id: str, *, after_user_id: str = "", limit: int = 0
    ) -> AsyncIterator[str]:
        """User ids of a segment's members, in user id order (identity streams a consistent
        snapshot): only those after ``after_user_id`` (a resume cursor), at most ``limit`` (0:
        all; the stream is cancelled there)."""
        try:
            key_id, secret = await self._keys.key(app_id)
        except Unavailable as error:
            raise PeerUnavailable(str(error)) from None
        except NotFound as error:
            raise PeerRefused(grpc.StatusCode.NOT_FOUND, str(error)) from None
        call = self._identity_stub().ListSegmentMembers(
            segment_pb2.ListSegmentMembersRequest(
                segment_id=segment_id, after_user_id=after_user_id
            ),
            metadata=bearer(secret),
        )
        count = 0
        try:
            async for member in call:
                yield str(member.user_id)
                count += 1
                if count == limit:
                    break
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                await self._keys.forget(app_id, key_id)  # revoked: the retry mints a new one
            raise _translate(error) from None
        finally:
            call.cancel()  # the rest of the stream is not wanted (a no-op once it ended)

    async def segment_exists(self, app_id: str, segment_id: str) -> bool:
        """Whether identity has the segment."""
        try:
            await self._call(
                app_id,
                self._identity_stub().GetSegment,
                segment_pb2.GetSegmentRequest(segment_id=segment_id),
            )
        except PeerRefused as refused:
            if refused.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return False
            raise
        return True

    async def is_member(self, app_id: str, segment_id: str, user_id: uuid.UUID) -> bool:
        """Whether a user is a member of a segment now."""
        response = await self._call(
            app_id,
            self._identity_stub().GetSegmentMembership,
            segment_pb2.GetSegmentMembershipRequest(
                segment_id=segment_id, user=user_ref_pb2.UserRef(user_id=str(user_id))
            ),
        )
        return bool(response.member)

    async def events(
        self,
        app_id: str,
        user_id: uuid.UUID,
        name: str,
        start: datetime | None,
        end: datetime | None,
        limit: int = 10_000,
    ) -> list[Any]:
        """A user's stored events named ``name`` in a window, newest first (at most ``limit``)."""
        request = ipb.ListEventsRequest(
            user=user_ref_pb2.UserRef(user_id=str(user_id)), name=name, page_size=1000
        )
        if start is not None:
            request.start_time.FromDatetime(start)
        if end is not None:
            request.end_time.FromDatetime(end)
        found: list[Any] = []
        while len(found) < limit:
            response = await self._call(app_id, self._identity_stub().ListEvents, request)
            found.extend(response.events)
            if not response.next_page_token:
                break
            request.page_token = response.next_page_token
        return found[:limit]

    # -- delivery -----------------------------------------------------------------------------

    async def template_exists(self, app_id: str, template_id: str) -> bool:
        """Whether delivery has the template."""
        try:
            await self._call(
                app_id,
                self._delivery_stub().GetTemplate,
                delivery_service_pb2.GetTemplateRequest(template_id=template_id),
            )
        except PeerRefused as refused:
            if refused.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return False
            raise
        return True
