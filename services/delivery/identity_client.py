"""Delivery's calls to identity: profiles, audiences and opt-outs, with a server key per app.

IdentityService answers only app keys (the admin key is refused there), so delivery holds one
server key per app, minted with the admin key through ``AppsService.CreateApiKey`` the first
time the app needs it (display name ``tidings-delivery``), stored encrypted in
``identity_keys`` and cached in memory (:mod:`services.runtime.service_keys`, shared with
journey). A key someone revoked is noticed (UNAUTHENTICATED), forgotten and minted again once.

Errors: identity unreachable -> :class:`Unavailable` (workers retry the batch; RPCs answer
UNAVAILABLE); a user or segment that does not exist -> None / :class:`NotFound`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg
import grpc
import grpc.aio
from google.protobuf import field_mask_pb2
from tidings.identity.v1 import (
    apps_service_pb2,
    apps_service_pb2_grpc,
    identity_service_pb2,
    identity_service_pb2_grpc,
    segment_pb2,
    subscription_pb2,
    user_pb2,
    user_ref_pb2,
)

from services.delivery.secrets_box import SecretBox
from services.runtime.errors import NotFound, Unavailable
from services.runtime.service_keys import ServiceKeys

__all__ = ["BATCH_GET_MAX", "IdentityClient"]

#: Refs per BatchGetUsers call (identity's maximum).
BATCH_GET_MAX = 1_000
LIST_PAGE = 1_000
_TIMEOUT = 30.0
#: Seconds an app's default time zone is reused before identity is asked again.
ZONE_TTL = 60.0
_KEY_NAME = "tidings-delivery"

_T = TypeVar("_T")


def _unavailable(error: grpc.aio.AioRpcError) -> Unavailable:
    return Unavailable(
        "identity is unavailable; retry with backoff",
        reason="IDENTITY_UNAVAILABLE",
        metadata={"identity_code": error.code().name},
    )


class _KeyRevoked(Exception):
    pass


class IdentityClient:
    """Calls identity on behalf of apps.

    Args:
        target: identity's ``host:port``.
        admin_key: The admin key (mints the per-app keys).
        pool: Returns delivery's pool (read per call: it exists only once the service started).
        box: Seals the stored keys.
    """

    def __init__(
        self, target: str, admin_key: str, pool: Callable[[], asyncpg.Pool], box: SecretBox
    ) -> None:
        self._target = target
        self._admin_key = admin_key
        self._pool = pool
        self._box = box
        self._service_keys = ServiceKeys(
            lambda: self._stubs()[1], admin_key, pool, box, key_name=_KEY_NAME
        )
        self._channel: grpc.aio.Channel | None = None
        self._identity: Any = None
        self._apps: Any = None
        self._zones: dict[str, tuple[str, float]] = {}

    def _stubs(self) -> tuple[Any, Any]:
        if self._identity is None:
            self._channel = grpc.aio.insecure_channel(
                self._target,
                options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
            )
            self._identity = identity_service_pb2_grpc.IdentityServiceStub(self._channel)
            self._apps = apps_service_pb2_grpc.AppsServiceStub(self._channel)
        return self._identity, self._apps

    async def close(self) -> None:
        """Close the channel."""
        channel, self._channel, self._identity, self._apps = self._channel, None, None, None
        if channel is not None:
            await channel.close(None)

    # --- keys (minted, sealed, cached and renewed by services.runtime.service_keys) ---------

    async def _key(self, app_id: str) -> tuple[str, str]:
        return await self._service_keys.key(app_id)

    async def _forget(self, app_id: str, key_id: str) -> None:
        await self._service_keys.forget(app_id, key_id)

    async def _as_app(self, app_id: str, call: Callable[[Any, Any], Awaitable[_T]]) -> _T:
        """Run ``call(stub, metadata)`` with the app's key; re-mint once if it was revoked."""
        identity, _ = self._stubs()
        return await self._service_keys.as_app(app_id, lambda metadata: call(identity, metadata))

    # --- calls ----------------------------------------------------------------------------

    async def app_timezone(self, app_id: str) -> str:
        """The app's default IANA zone in identity (``AppSettings.default_timezone``; ``""``:
        UTC), cached for :data:`ZONE_TTL` seconds; the last value read while identity is down.

        Raises:
            Unavailable: identity could not be asked and the app's zone was never read.
        """
        cached = self._zones.get(app_id)
        if cached is not None and time.monotonic() < cached[1]:
            return cached[0]
        _, apps = self._stubs()
        try:
            app = await apps.GetApp(
                apps_service_pb2.GetAppRequest(app_id=app_id),
                metadata=(("authorization", f"Bearer {self._admin_key}"),),
                timeout=_TIMEOUT,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return ""
            if cached is not None:
                return cached[0]
            raise _unavailable(error) from None
        zone = str(app.settings.default_timezone)
        self._zones[app_id] = (zone, time.monotonic() + ZONE_TTL)
        return zone

    async def batch_get_users(
        self, app_id: str, refs: Sequence[user_ref_pb2.UserRef]
    ) -> list[user_pb2.User | None]:
        """The profiles of ``refs`` (None where there is none), in order; chunked by 1,000.

        Raises:
            Unavailable: identity could not be asked.
        """

        async def one(chunk: list[user_ref_pb2.UserRef]) -> Any:
            async def call(stub: Any, metadata: Any) -> Any:
                return await stub.BatchGetUsers(
                    identity_service_pb2.BatchGetUsersRequest(refs=chunk),
                    metadata=metadata,
                    timeout=_TIMEOUT,
                )

            try:
                return await self._as_app(app_id, call)
            except grpc.aio.AioRpcError as error:
                raise _unavailable(error) from None

        responses = await asyncio.gather(
            *(
                one(list(refs[start : start + BATCH_GET_MAX]))
                for start in range(0, len(refs), BATCH_GET_MAX)
            )
        )
        return [
            result.user if result.HasField("user") else None
            for response in responses
            for result in response.results
        ]

    async def get_user(self, app_id: str, ref: user_ref_pb2.UserRef) -> user_pb2.User:
        """One profile.

        Raises:
            NotFound: No such user (USER_NOT_FOUND).
            Unavailable: identity could not be asked.
        """
        [user] = await self.batch_get_users(app_id, [ref])
        if user is None:
            raise NotFound("user not found", reason="USER_NOT_FOUND")
        return user

    async def list_user_ids(self, app_id: str, page_token: str) -> tuple[list[str], str]:
        """One page of the app's user ids (oldest first) and the next page token."""

        async def call(stub: Any, metadata: Any) -> Any:
            return await stub.ListUsers(
                identity_service_pb2.ListUsersRequest(
                    page_size=LIST_PAGE,
                    page_token=page_token,
                    # Ids only: identity loads no profile (a broadcast renders later, per user).
                    view=identity_service_pb2.ListUsersRequest.VIEW_IDS,
                ),
                metadata=metadata,
                timeout=_TIMEOUT,
            )

        try:
            response = await self._as_app(app_id, call)
        except grpc.aio.AioRpcError as error:
            raise _unavailable(error) from None
        return [user.user_id for user in response.users], response.next_page_token

    async def segment_members(
        self, app_id: str, segment_id: str, *, after_user_id: str = ""
    ) -> AsyncIterator[str]:
        """Stream the user ids of a segment's members, in user id order (after ``after_user_id``).

        Raises:
            NotFound: The segment does not exist (SEGMENT_NOT_FOUND).
            FailedPrecondition-like Unavailable: identity could not be asked.
        """
        key_id, secret = await self._key(app_id)
        identity, _ = self._stubs()
        stream = identity.ListSegmentMembers(
            segment_pb2.ListSegmentMembersRequest(
                segment_id=segment_id, after_user_id=after_user_id
            ),
            metadata=(("authorization", f"Bearer {secret}"),),
        )
        try:
            async for member in stream:
                yield member.user_id
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise NotFound(
                    f"segment {segment_id!r} not found",
                    reason="SEGMENT_NOT_FOUND",
                    metadata={"segment_id": segment_id},
                ) from None
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                await self._forget(app_id, key_id)
            raise _unavailable(error) from None

    async def opt_out(self, app_id: str, subscription_id: str, reason: str) -> None:
        """Set a subscription's opt-in to UNSUBSCRIBED (one-click unsubscribe).

        Raises:
            Unavailable: identity could not be asked.
        """

        async def call(stub: Any, metadata: Any) -> Any:
            return await stub.UpdateSubscription(
                identity_service_pb2.UpdateSubscriptionRequest(
                    subscription=subscription_pb2.Subscription(
                        subscription_id=subscription_id,
                        opt_in=subscription_pb2.OPT_IN_STATE_UNSUBSCRIBED,
                        opt_in_reason=reason,
                    ),
                    update_mask=field_mask_pb2.FieldMask(paths=["opt_in", "opt_in_reason"]),
                ),
                metadata=metadata,
                timeout=_TIMEOUT,
            )

        try:
            await self._as_app(app_id, call)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return  # the subscription is gone: nothing left to opt out
            raise _unavailable(error) from None
