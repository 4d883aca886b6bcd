"""IdentityService methods about users, aliases and customer fields: proto in, domain, proto out.

:func:`user_to_proto` is what every identity method that answers with a ``User`` uses (the
subscriptions mixin calls it through :meth:`UsersRpcs._user_proto`).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import grpc.aio
from google.protobuf import empty_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import status_pb2
from google.type import date_pb2
from tidings.identity.v1 import customer_field_pb2, user_pb2
from tidings.identity.v1 import identity_service_pb2 as pb

from services.identity import access, pii_fields, refs, users, users_store
from services.identity.events_server import event_proto
from services.identity.fields import CustomerField, FieldType
from services.identity.subscriptions_server import subscription_to_proto
from services.identity.users import (
    InvalidValue,
    RawValue,
    Upserted,
    UpsertRequest,
    UserFields,
)
from services.identity.users_store import Alias, JsonScalar, Profile, User
from services.runtime.app import ServiceContext
from services.runtime.errors import DomainError, FieldViolations, NotFound, to_status_proto

__all__ = ["UsersRpcs", "field_to_proto", "profile_to_proto", "user_to_proto"]

_Context = grpc.aio.ServicerContext[Any, Any]
#: ``ErrorInfo.domain`` of per-item errors in batch answers.
_DOMAIN = "identity"

_FIELD_TYPE_TO_PROTO = {
    FieldType.STRING: customer_field_pb2.FIELD_TYPE_STRING,
    FieldType.NUMBER: customer_field_pb2.FIELD_TYPE_NUMBER,
    FieldType.BOOL: customer_field_pb2.FIELD_TYPE_BOOL,
    FieldType.TIMESTAMP: customer_field_pb2.FIELD_TYPE_TIMESTAMP,
    FieldType.DATE: customer_field_pb2.FIELD_TYPE_DATE,
}
_FIELD_TYPE_FROM_PROTO = {value: key for key, value in _FIELD_TYPE_TO_PROTO.items()}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


_LIST_VIEWS = frozenset(pb.ListUsersRequest.View.values())


@functools.lru_cache(maxsize=1024)
def _timestamp(moment: datetime) -> Timestamp:
    # Cached: the users of one batch share their create/update times, and building a
    # Timestamp costs a few microseconds. Safe to share: message fields copy on assignment
    # and nobody mutates the cached ones.
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _status(error: DomainError) -> status_pb2.Status:
    status: status_pb2.Status = to_status_proto(error, domain=_DOMAIN)
    return status


# -- proto → domain ------------------------------------------------------------------------------


def _attribute_from_proto(value: user_pb2.AttributeValue) -> RawValue:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return value.number_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "timestamp_value":
        # Timestamp.ToDatetime's checks and conversion, several times cheaper (thousands of
        # these per batch): nanos in range, and a moment datetime can hold (years 1-9999).
        stamp = value.timestamp_value
        nanos = stamp.nanos
        if 0 <= nanos < 1_000_000_000:
            try:
                moment = datetime.fromtimestamp(stamp.seconds, UTC)
            except (ValueError, OverflowError, OSError):
                pass  # outside years 1-9999
            else:
                return moment.replace(microsecond=nanos // 1_000) if nanos else moment
        return InvalidValue("not a valid point in time")
    if kind == "null_value":
        return None
    return InvalidValue(
        "set one of string_value, number_value, bool_value, timestamp_value or null_value"
    )


def _birthdate(birthdate: date_pb2.Date) -> tuple[int, int, int]:
    return birthdate.year, birthdate.month, birthdate.day


def _user_fields(user: user_pb2.User) -> UserFields:
    attributes = user.attributes
    return UserFields(
        external_id=user.external_id,
        first_name=user.first_name,
        last_name=user.last_name,
        email=user.email,
        phone=user.phone,
        birthdate=_birthdate(user.birthdate) if user.HasField("birthdate") else None,
        timezone=user.timezone,
        language=user.language,
        country=user.country,
        # Keys then lookups: the map's items() is a pure-Python view, measurably slower.
        attributes={name: _attribute_from_proto(attributes[name]) for name in attributes},
        has_aliases=len(user.aliases) > 0,
    )


def _upsert_request(request: pb.UpsertUserRequest, prefix: str = "") -> UpsertRequest:
    violations = FieldViolations()
    key = refs.parse_ref(request.ref, f"{prefix}ref", violations)
    return UpsertRequest(
        ref=key,
        user=_user_fields(request.user),
        # Presence and length checks first: most items have neither, and reading an absent
        # mask or map still builds Python objects.
        update_mask=list(request.update_mask.paths) if request.HasField("update_mask") else (),
        increments=dict(request.increment_attributes) if request.increment_attributes else {},
        violations=violations,
        prefix=prefix,
    )


def _ref_key(ref: Any, field: str) -> refs.RefKey | DomainError:
    try:
        return refs.ref_key(ref, field=field)
    except DomainError as error:
        return error


# -- domain → proto ------------------------------------------------------------------------------


def _set_time(stamp: Timestamp, moment: datetime) -> None:
    """``stamp.FromDatetime(moment)`` for an aware datetime, without its Python overhead
    (one per timestamp attribute of every user of a batch answer)."""
    delta = moment - _EPOCH
    stamp.seconds = delta.days * 86_400 + delta.seconds
    stamp.nanos = delta.microseconds * 1_000


def _fill_attributes(
    message: user_pb2.User, stored: Mapping[str, JsonScalar], timestamp_attributes: frozenset[str]
) -> None:
    """Set ``message.attributes`` from stored values, field by field rather than through
    copied messages; timestamps are parsed back as :func:`users.typed_attributes` does."""
    attributes = message.attributes
    for name, value in stored.items():
        slot = attributes[name]
        if isinstance(value, bool):
            slot.bool_value = value
        elif isinstance(value, float | int):
            slot.number_value = value
        elif name not in timestamp_attributes:
            slot.string_value = value
        else:
            try:
                _set_time(slot.timestamp_value, users_store.parse_timestamp(value))
            except ValueError:
                # Not a time after all: show what is stored rather than fail the read.
                slot.string_value = value


def _fill_profile(
    message: user_pb2.User,
    profile: Profile,
    timestamp_attributes: frozenset[str],
    aliases: list[Alias] | None = None,
) -> None:
    """Set the fields of an empty ``User`` message from a profile row (no subscriptions or
    counts). Fills in place: a batch answer's items are added to the response, not copied."""
    message.user_id = str(profile.user_id)
    if profile.external_id:
        message.external_id = profile.external_id
    if profile.first_name:
        message.first_name = profile.first_name
    if profile.last_name:
        message.last_name = profile.last_name
    if profile.email:
        message.email = profile.email
    if profile.phone:
        message.phone = profile.phone
    if profile.timezone:
        message.timezone = profile.timezone
    if profile.language:
        message.language = profile.language
    if profile.country:
        message.country = profile.country
    message.create_time.CopyFrom(_timestamp(profile.create_time))
    message.update_time.CopyFrom(_timestamp(profile.update_time))
    birthdate = profile.birthdate
    if birthdate is not None:
        date = message.birthdate
        date.year = birthdate.year or 0
        date.month = birthdate.month
        date.day = birthdate.day
    if profile.attributes:
        _fill_attributes(message, profile.attributes, timestamp_attributes)
    for alias in aliases or ():
        message.aliases.add(label=alias.label, value=alias.value)


def profile_to_proto(
    profile: Profile, timestamp_attributes: frozenset[str], aliases: list[Alias] | None = None
) -> user_pb2.User:
    """A ``User`` message of a profile row (no subscriptions or counts)."""
    message = user_pb2.User()
    _fill_profile(message, profile, timestamp_attributes, aliases)
    return message


def _fill_user(message: user_pb2.User, user: User, *, with_subscriptions: bool = True) -> None:
    _fill_profile(message, user.profile, user.timestamp_attributes, user.aliases)
    if with_subscriptions:
        if user.subscriptions:
            message.subscriptions.extend(subscription_to_proto(s) for s in user.subscriptions)
        message.counts.subscriptions = user.subscription_count
        message.counts.events = user.event_count


def user_to_proto(user: User, *, with_subscriptions: bool = True) -> user_pb2.User:
    """The ``User`` message of a whole profile."""
    message = user_pb2.User()
    _fill_user(message, user, with_subscriptions=with_subscriptions)
    return message


def field_to_proto(field: CustomerField) -> customer_field_pb2.CustomerField:
    """The ``CustomerField`` message of a definition."""
    message = customer_field_pb2.CustomerField(
        name=field.name,
        type=_FIELD_TYPE_TO_PROTO[field.type],
        description=field.description,
        pii=field.pii,
        auto_defined=field.auto_defined,
    )
    if field.create_time is not None:
        message.create_time.CopyFrom(_timestamp(field.create_time))
    return message


def _fill_upserted(message: user_pb2.User, result: Upserted) -> None:
    if result.user is not None:
        _fill_user(message, result.user)
    else:
        _fill_profile(message, result.profile, result.timestamp_attributes)


class UsersRpcs:
    """Mixin of :class:`~services.identity.server.IdentityServicer` for users.

    Every method needs a server key of an app, and works inside that app only.
    """

    _ctx: ServiceContext

    async def UpsertUser(
        self, request: pb.UpsertUserRequest, context: _Context
    ) -> pb.UpsertUserResponse:
        """Create or update one user (see :mod:`services.identity.users` for the rules)."""
        caller = access.server_app()
        async with self._ctx.pool.acquire() as conn:
            (result,) = await users.upsert_users(
                conn,
                caller.app_id,
                [_upsert_request(request)],
                at=self._ctx.clock(),
                with_users=True,
            )
        if isinstance(result, DomainError):
            raise result
        response = pb.UpsertUserResponse(created=result.created)
        _fill_upserted(response.user, result)
        return response

    async def BatchUpsertUsers(
        self, request: pb.BatchUpsertUsersRequest, context: _Context
    ) -> pb.BatchUpsertUsersResponse:
        """Upsert up to 1,000 users, a result per item.

        Each result's user is the profile row after the batch (attributes, not aliases,
        subscriptions or counts: GetUser/BatchGetUsers return those).
        """
        caller = access.server_app()
        items = [
            _upsert_request(item, f"requests[{index}].")
            for index, item in enumerate(request.requests)
        ]
        async with self._ctx.pool.acquire() as conn:
            results = await users.upsert_users(conn, caller.app_id, items, at=self._ctx.clock())
        ids_only = request.result_view == pb.BatchUpsertUsersRequest.RESULT_VIEW_IDS
        response = pb.BatchUpsertUsersResponse()
        add = response.results.add
        for result in results:
            if isinstance(result, DomainError):
                add(error=_status(result))
            elif ids_only:
                user = add(created=result.created).user
                user.user_id = str(result.profile.user_id)
                if result.profile.external_id:
                    user.external_id = result.profile.external_id
            else:
                item = add(created=result.created)
                _fill_upserted(item.user, result)
        return response

    async def GetUser(self, request: pb.GetUserRequest, context: _Context) -> user_pb2.User:
        """One whole profile."""
        caller = access.server_app()
        key = refs.ref_key(request.ref)
        async with self._ctx.pool.acquire() as conn:
            user = await users.get_user(conn, caller.app_id, key)
        return user_to_proto(user)

    async def BatchGetUsers(
        self, request: pb.BatchGetUsersRequest, context: _Context
    ) -> pb.BatchGetUsersResponse:
        """Up to 1,000 whole profiles, a result per ref in order."""
        caller = access.server_app()
        keys = [_ref_key(ref, f"refs[{index}]") for index, ref in enumerate(request.refs)]
        async with self._ctx.pool.acquire() as conn:
            results = await users.get_users(conn, caller.app_id, keys)
        response = pb.BatchGetUsersResponse()
        for result in results:
            if isinstance(result, DomainError):
                response.results.add(error=_status(result))
            else:
                response.results.add(user=user_to_proto(result))
        return response

    async def ListUsers(
        self, request: pb.ListUsersRequest, context: _Context
    ) -> pb.ListUsersResponse:
        """A page of users, oldest first (with aliases; subscriptions and counts left out), or
        only their ids."""
        caller = access.server_app()
        if request.view not in _LIST_VIEWS:
            violations = FieldViolations()
            violations.add("view", f"unknown view {request.view}", reason="INVALID_VALUE")
            violations.raise_if_any()
        size, token = request.page_size, request.page_token
        response = pb.ListUsersResponse()
        if request.view == pb.ListUsersRequest.VIEW_IDS:
            async with self._ctx.pool.acquire() as conn:
                listed, response.next_page_token = await users.list_user_ids(
                    conn, caller.app_id, size=size, token=token
                )
            for one in listed:
                message = response.users.add(user_id=str(one.user_id))
                if one.external_id is not None:
                    message.external_id = one.external_id
                message.create_time.FromDatetime(one.create_time)
            return response
        async with self._ctx.pool.acquire() as conn:
            page, response.next_page_token = await users.list_users(
                conn, caller.app_id, size=size, token=token
            )
        response.users.extend(user_to_proto(user, with_subscriptions=False) for user in page)
        return response

    async def DeleteUser(self, request: pb.DeleteUserRequest, context: _Context) -> empty_pb2.Empty:
        """Erase a user (GDPR)."""
        caller = access.server_app()
        key = refs.ref_key(request.ref)
        async with self._ctx.pool.acquire() as conn:
            await users.delete_user(conn, caller.app_id, key, at=self._ctx.clock())
        return empty_pb2.Empty()

    async def ExportUser(
        self, request: pb.ExportUserRequest, context: _Context
    ) -> pb.ExportUserResponse:
        """Everything held about a user; the events in pages of at most ~3 MB."""
        caller = access.server_app()
        key = refs.ref_key(request.ref)
        async with self._ctx.pool.acquire() as conn:
            export = await users.export_user(
                conn,
                caller.app_id,
                key,
                event_proto,
                events_page_token=request.events_page_token,
            )
        response = pb.ExportUserResponse(
            events=export.events, next_events_page_token=export.next_events_page_token
        )
        if export.user is not None:
            response.user.CopyFrom(user_to_proto(export.user))
        for merge in export.merges:
            response.merges.add(
                from_user_id=str(merge.from_user_id),
                into_user_id=str(merge.into_user_id),
                subscription_id=str(merge.subscription_id) if merge.subscription_id else "",
                key_id=merge.key_id,
                merge_time=_timestamp(merge.merge_time),
            )
        return response

    async def AddAlias(self, request: pb.AddAliasRequest, context: _Context) -> user_pb2.User:
        """Give a user an alias."""
        caller = access.server_app()
        key = refs.ref_key(request.ref)
        alias = Alias(request.alias.label, request.alias.value)
        async with self._ctx.pool.acquire() as conn:
            user = await users.add_alias(conn, caller.app_id, key, alias, at=self._ctx.clock())
        return user_to_proto(user)

    async def RemoveAlias(self, request: pb.RemoveAliasRequest, context: _Context) -> user_pb2.User:
        """Remove a user's alias by label."""
        caller = access.server_app()
        key = refs.ref_key(request.ref)
        async with self._ctx.pool.acquire() as conn:
            user = await users.remove_alias(
                conn, caller.app_id, key, request.label, at=self._ctx.clock()
            )
        return user_to_proto(user)

    async def CreateCustomerField(
        self, request: pb.CreateCustomerFieldRequest, context: _Context
    ) -> customer_field_pb2.CustomerField:
        """Define a custom attribute."""
        caller = access.server_app()
        field_type = _FIELD_TYPE_FROM_PROTO.get(request.field.type)
        if field_type is None:
            violations = FieldViolations()
            violations.add("field.type", "set the field's type", reason="REQUIRED")
            violations.raise_if_any()
            raise AssertionError("unreachable")
        definition = CustomerField(
            name=request.field.name,
            type=field_type,
            description=request.field.description,
            pii=request.field.pii,
        )
        async with self._ctx.pool.acquire() as conn:
            stored = await users.create_customer_field(
                conn, caller.app_id, definition, at=self._ctx.clock()
            )
        return field_to_proto(stored)

    async def UpdateCustomerField(
        self, request: pb.UpdateCustomerFieldRequest, context: _Context
    ) -> customer_field_pb2.CustomerField:
        """Change a custom attribute's description or PII flag (converting its values)."""
        caller = access.server_app()
        definition = CustomerField(
            name=request.field.name,
            type=FieldType.STRING,  # not updatable: ignored
            description=request.field.description,
            pii=request.field.pii,
        )
        async with self._ctx.pool.acquire() as conn:
            stored = await pii_fields.update_customer_field(
                conn, caller.app_id, definition, list(request.update_mask.paths)
            )
        return field_to_proto(stored)

    async def ListCustomerFields(
        self, request: pb.ListCustomerFieldsRequest, context: _Context
    ) -> pb.ListCustomerFieldsResponse:
        """A page of the app's customer fields, by name."""
        caller = access.server_app()
        async with self._ctx.pool.acquire() as conn:
            page, token = await users.list_customer_fields(
                conn, caller.app_id, size=request.page_size, token=request.page_token
            )
        return pb.ListCustomerFieldsResponse(
            fields=[field_to_proto(field) for field in page], next_page_token=token
        )

    async def _user_proto(self, caller: access.AppCaller, user_id: object) -> user_pb2.User:
        """The whole profile of ``user_id`` in the caller's app, for methods answering a User.

        Raises:
            NotFound: ``USER_NOT_FOUND`` if it does not exist (erased meanwhile).
        """
        user_uuid = user_id if isinstance(user_id, uuid.UUID) else uuid.UUID(str(user_id))
        async with self._ctx.pool.acquire() as conn:
            loaded: Mapping[uuid.UUID, User] = await users_store.load_users(
                conn, caller.app_id, [user_uuid]
            )
        user = loaded.get(user_uuid)
        if user is None:
            raise NotFound(f"no user with user_id {str(user_uuid)!r}", reason="USER_NOT_FOUND")
        return user_to_proto(user)
