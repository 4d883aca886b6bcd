"""IdentityService methods about events: proto in, domain call, proto out."""

from __future__ import annotations

from datetime import datetime

import grpc.aio
from google.protobuf import struct_pb2, timestamp_pb2
from tidings.identity.v1 import event_pb2, identity_service_pb2

from services.identity import events
from services.identity.access import client_or_server_app, server_app
from services.identity.events_store import Event
from services.runtime.app import ServiceContext
from services.runtime.errors import to_status_proto

__all__ = ["EventsRpcs", "event_proto"]

_DOMAIN = "identity"


def _datetime(value: timestamp_pb2.Timestamp, present: bool, field: str) -> datetime | None:
    return events.timestamp_datetime(value, field) if present else None


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def event_proto(event: Event) -> event_pb2.Event:
    """A stored event as the API's ``Event`` (also used by ExportUser)."""
    properties = struct_pb2.Struct()
    if event.properties:
        properties.update(event.properties)
    return event_pb2.Event(
        event_id=event.event_id,
        user_id=str(event.user_id),
        name=event.name,
        properties=properties,
        occurred_at=_timestamp(event.occurred_at),
        receive_time=_timestamp(event.receive_time),
    )


class EventsRpcs:
    """Mixin of :class:`~services.identity.server.IdentityServicer` for events."""

    _ctx: ServiceContext

    async def TrackEvents(
        self,
        request: identity_service_pb2.TrackEventsRequest,
        context: grpc.aio.ServicerContext[
            identity_service_pb2.TrackEventsRequest, identity_service_pb2.TrackEventsResponse
        ],
    ) -> identity_service_pb2.TrackEventsResponse:
        """Track up to 1,000 events; answers once they are on ``identity.events``.

        Server and client keys; a client key may only name a ``subscription_id``. One result
        per event: a refused event carries its status and does not fail the others. The events
        become visible to ListEvents once identity's consumer stored them (typically tens of
        milliseconds later).
        """
        caller = client_or_server_app()
        inputs = [
            events.EventInput(
                ref=item.user,
                name=item.name,
                properties=item.properties,
                occurred_at=item.occurred_at if item.HasField("occurred_at") else None,
                event_id=item.event_id,
            )
            for item in request.events
        ]
        results = await events.track_events(self._ctx, caller, inputs)
        response = identity_service_pb2.TrackEventsResponse()
        for result in results:
            item = response.results.add()
            if result.error is not None:
                item.error.CopyFrom(to_status_proto(result.error, domain=_DOMAIN))
            else:
                item.event_id = result.event_id
                item.user_id = str(result.user_id)
        return response

    async def ListEvents(
        self,
        request: identity_service_pb2.ListEventsRequest,
        context: grpc.aio.ServicerContext[
            identity_service_pb2.ListEventsRequest, identity_service_pb2.ListEventsResponse
        ],
    ) -> identity_service_pb2.ListEventsResponse:
        """A page of a user's stored events, newest first. Server keys only.

        Read-your-writes lag: an event accepted by TrackEvents is listed once identity's
        consumer of ``identity.events`` stored it, typically tens of milliseconds after
        TrackEvents answered, longer while the consumer works through a backlog.
        """
        caller = server_app()
        page = await events.list_events(
            self._ctx,
            caller,
            events.EventQuery(
                ref=request.user,
                name=request.name,
                start_time=_datetime(
                    request.start_time, request.HasField("start_time"), "start_time"
                ),
                end_time=_datetime(request.end_time, request.HasField("end_time"), "end_time"),
                page_size=request.page_size,
                page_token=request.page_token,
            ),
            event_proto,
        )
        return identity_service_pb2.ListEventsResponse(
            events=page.events, next_page_token=page.next_page_token
        )
