"""IdentityService methods about subscriptions, Login and Logout: proto in, domain call, proto out.

:func:`subscription_to_proto` is also what the users methods use to fill ``User.subscriptions``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import grpc.aio
from google.protobuf import empty_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from tidings.identity.v1 import identity_service_pb2 as pb
from tidings.identity.v1 import subscription_pb2
from tidings.identity.v1.user_pb2 import User as UserProto

from services.identity import access, login, refs, subscriptions
from services.identity.subscriptions import NewSubscription, SubscriptionPatch
from services.identity.subscriptions_store import (
    DeviceInfo,
    OptIn,
    Subscription,
    SubscriptionType,
    WebPushKeys,
)
from services.runtime.app import ServiceContext

__all__ = [
    "OPT_IN_TO_PROTO",
    "TYPE_TO_PROTO",
    "SubscriptionsRpcs",
    "new_subscription_from_proto",
    "subscription_to_proto",
]

_Context = grpc.aio.ServicerContext[Any, Any]
_Type = subscription_pb2.SubscriptionType
_OptIn = subscription_pb2.OptInState

#: Stored type → proto enum.
TYPE_TO_PROTO: dict[SubscriptionType, _Type.ValueType] = {
    SubscriptionType.IOS_PUSH: subscription_pb2.SUBSCRIPTION_TYPE_IOS_PUSH,
    SubscriptionType.ANDROID_PUSH: subscription_pb2.SUBSCRIPTION_TYPE_ANDROID_PUSH,
    SubscriptionType.WEB_PUSH: subscription_pb2.SUBSCRIPTION_TYPE_WEB_PUSH,
    SubscriptionType.EMAIL: subscription_pb2.SUBSCRIPTION_TYPE_EMAIL,
    SubscriptionType.SMS: subscription_pb2.SUBSCRIPTION_TYPE_SMS,
    SubscriptionType.WHATSAPP: subscription_pb2.SUBSCRIPTION_TYPE_WHATSAPP,
    SubscriptionType.TELEGRAM: subscription_pb2.SUBSCRIPTION_TYPE_TELEGRAM,
}
_TYPE_FROM_PROTO = {value: key for key, value in TYPE_TO_PROTO.items()}

#: Stored opt-in state → proto enum.
OPT_IN_TO_PROTO: dict[OptIn, _OptIn.ValueType] = {
    OptIn.SUBSCRIBED: subscription_pb2.OPT_IN_STATE_SUBSCRIBED,
    OptIn.UNSUBSCRIBED: subscription_pb2.OPT_IN_STATE_UNSUBSCRIBED,
}
_OPT_IN_FROM_PROTO = {value: key for key, value in OPT_IN_TO_PROTO.items()}


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def subscription_to_proto(subscription: Subscription) -> subscription_pb2.Subscription:
    """The API form of a stored subscription."""
    s = subscription
    message = subscription_pb2.Subscription(
        subscription_id=str(s.subscription_id),
        user_id=str(s.user_id),
        type=TYPE_TO_PROTO[s.type],
        token=s.token,
        enabled=s.enabled,
        opt_in=OPT_IN_TO_PROTO[s.opt_in],
        opt_in_change_time=_timestamp(s.opt_in_change_time),
        opt_in_reason=s.opt_in_reason,
        last_active_time=_timestamp(s.last_active_time),
        create_time=_timestamp(s.create_time),
        update_time=_timestamp(s.update_time),
        disabled_reason=s.disabled_reason,
    )
    if s.web_push_keys is not None:
        message.web_push_keys.p256dh = s.web_push_keys.p256dh
        message.web_push_keys.auth = s.web_push_keys.auth
    if s.device != DeviceInfo():
        message.device.CopyFrom(
            subscription_pb2.DeviceInfo(
                model=s.device.model,
                os=s.device.os,
                app_version=s.device.app_version,
                sdk=s.device.sdk,
            )
        )
    return message


def new_subscription_from_proto(message: subscription_pb2.Subscription) -> NewSubscription:
    """The caller-settable fields of a request's subscription (output-only fields are ignored).

    An unspecified (or unknown) type becomes None, which validation reports as required.
    """
    return NewSubscription(
        type=_TYPE_FROM_PROTO.get(message.type),
        token=message.token,
        web_push_keys=(
            WebPushKeys(message.web_push_keys.p256dh, message.web_push_keys.auth)
            if message.HasField("web_push_keys")
            else None
        ),
        opt_in=_OPT_IN_FROM_PROTO.get(message.opt_in),
        opt_in_reason=message.opt_in_reason,
        device=(
            DeviceInfo(
                model=message.device.model,
                os=message.device.os,
                app_version=message.device.app_version,
                sdk=message.device.sdk,
            )
            if message.HasField("device")
            else None
        ),
    )


class SubscriptionsRpcs:
    """Mixin of :class:`~services.identity.server.IdentityServicer` for subscriptions."""

    _ctx: ServiceContext
    #: The whole profile of a user as a ``User`` message (provided by ``UsersRpcs``).
    _user_proto: Callable[[access.AppCaller, object], Awaitable[UserProto]]

    async def CreateSubscription(
        self,
        request: pb.CreateSubscriptionRequest,
        context: _Context,
    ) -> subscription_pb2.Subscription:
        caller = access.client_or_server_app()
        user = None
        if request.HasField("user"):
            # Who may name a user is decided before the ref itself is looked at (AIP-211).
            subscriptions.check_may_choose_user(caller)
            user = refs.ref_key(request.user, field="user")
        created = await subscriptions.create_subscription(
            self._ctx.pool,
            caller,
            new_subscription_from_proto(request.subscription),
            user,
            self._ctx.clock(),
            request_id=request.request_id,
        )
        return subscription_to_proto(created)

    async def UpdateSubscription(
        self,
        request: pb.UpdateSubscriptionRequest,
        context: _Context,
    ) -> subscription_pb2.Subscription:
        caller = access.client_or_server_app()
        subscription_id = subscriptions.parse_subscription_id(
            request.subscription.subscription_id, "subscription.subscription_id"
        )
        patch = SubscriptionPatch(
            paths=frozenset(request.update_mask.paths),
            values=new_subscription_from_proto(request.subscription),
            enabled=request.subscription.enabled,
        )
        updated = await subscriptions.update_subscription(
            self._ctx.pool, caller, subscription_id, patch, self._ctx.clock()
        )
        return subscription_to_proto(updated)

    async def GetSubscription(
        self, request: pb.GetSubscriptionRequest, context: _Context
    ) -> subscription_pb2.Subscription:
        caller = access.server_app()
        found = await subscriptions.get_subscription(
            self._ctx.pool, caller, subscriptions.parse_subscription_id(request.subscription_id)
        )
        return subscription_to_proto(found)

    async def DeleteSubscription(
        self,
        request: pb.DeleteSubscriptionRequest,
        context: _Context,
    ) -> empty_pb2.Empty:
        caller = access.server_app()
        await subscriptions.delete_subscription(
            self._ctx.pool,
            caller,
            subscriptions.parse_subscription_id(request.subscription_id),
            self._ctx.clock(),
        )
        return empty_pb2.Empty()

    async def AssignSubscription(
        self,
        request: pb.AssignSubscriptionRequest,
        context: _Context,
    ) -> subscription_pb2.Subscription:
        caller = access.server_app()
        subscription_id = subscriptions.parse_subscription_id(request.subscription_id)
        user = refs.ref_key(request.user, field="user")
        moved = await subscriptions.assign_subscription(
            self._ctx.pool, caller, subscription_id, user, self._ctx.clock()
        )
        return subscription_to_proto(moved)

    async def UnassignSubscription(
        self,
        request: pb.UnassignSubscriptionRequest,
        context: _Context,
    ) -> subscription_pb2.Subscription:
        caller = access.server_app()
        moved = await subscriptions.unassign_subscription(
            self._ctx.pool,
            caller,
            subscriptions.parse_subscription_id(request.subscription_id),
            self._ctx.clock(),
        )
        return subscription_to_proto(moved)

    async def Login(self, request: pb.LoginRequest, context: _Context) -> pb.LoginResponse:
        caller = access.client_or_server_app()
        result = await login.login(
            self._ctx.pool,
            caller,
            request.subscription_id,
            request.external_id,
            self._ctx.clock(),
            external_id_proof=request.external_id_proof,
        )
        if caller.is_client:
            # Client keys never read profiles: the SDK learns who it is, nothing more.
            user = UserProto(user_id=str(result.user_id), external_id=request.external_id)
        else:
            user = await self._user_proto(caller, result.user_id)
        return pb.LoginResponse(
            user=user,
            merged_user_id=str(result.merged_user_id) if result.merged_user_id else "",
        )

    async def Logout(self, request: pb.LogoutRequest, context: _Context) -> pb.LogoutResponse:
        caller = access.client_or_server_app()
        held = await login.logout(
            self._ctx.pool, caller, request.subscription_id, self._ctx.clock()
        )
        if caller.is_client:
            return pb.LogoutResponse(user=UserProto(user_id=str(held.user_id)))
        return pb.LogoutResponse(user=await self._user_proto(caller, held.user_id))
