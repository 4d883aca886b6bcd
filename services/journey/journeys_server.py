"""``tidings.journey.v1.JourneyService``: protobuf in, domain calls, protobuf out.

Every method needs a server key of an app and works inside that app; the key is remembered
as the app's credential for the engine's own calls (see :mod:`services.journey.peers`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import grpc.aio
from google.protobuf import empty_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import status_pb2
from tidings.journey.v1 import journey_pb2 as jpb
from tidings.journey.v1 import journey_service_pb2 as pb
from tidings.journey.v1 import journey_service_pb2_grpc

from services.journey import customers, journeys, stats
from services.journey.catalog import Catalog
from services.journey.definitions import Problem
from services.journey.engine import Engine
from services.journey.entries import Stepper
from services.journey.instances_store import Instance, StepRow
from services.journey.journeys_store import JourneyRow
from services.journey.peers import Peers
from services.journey.settings import JourneySettings
from services.runtime.app import ServiceContext
from services.runtime.auth import Scope, require_scope
from services.runtime.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    FieldViolations,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    to_status_proto,
)
from services.runtime.request_values import to_datetime

__all__ = ["JourneyServicer"]

_Context = grpc.aio.ServicerContext[Any, Any]

_STATES = {
    "draft": jpb.Journey.STATE_DRAFT,
    "active": jpb.Journey.STATE_ACTIVE,
    "paused": jpb.Journey.STATE_PAUSED,
    "stopped": jpb.Journey.STATE_STOPPED,
}
_STATUSES = {
    "active": pb.CustomerState.STATUS_ACTIVE,
    "waiting": pb.CustomerState.STATUS_WAITING,
    "exited": pb.CustomerState.STATUS_EXITED,
    "converted": pb.CustomerState.STATUS_CONVERTED,
}
#: Entry outcomes → the domain errors (so gRPC codes) of per-customer errors; the rest are
#: FAILED_PRECONDITION.
_OUTCOME_ERRORS: dict[str, type[DomainError]] = {
    "DUPLICATE_TRIGGER": AlreadyExists,
    "ALREADY_INSIDE": AlreadyExists,
    "USER_NOT_FOUND": NotFound,
    "INVALID_REF": InvalidArgument,
}
#: ``ErrorInfo.domain`` of per-customer errors, as of the errors the service raises.
_DOMAIN = "journey"
_OUTCOME_MESSAGES = {
    "DUPLICATE_TRIGGER": "this trigger already entered the customer",
    "ALREADY_INSIDE": "the customer is inside the journey",
    "REENTRY_REFUSED": "the journey's re-entry rule refuses the customer",
    "CONCURRENCY_LIMIT": "the journey has as many customers inside as it allows",
    "OUTSIDE_SCHEDULE": "the journey's entry schedule is closed",
    "JOURNEY_NOT_ACTIVE": "the journey is not active",
    "USER_NOT_FOUND": "no such customer",
}


def _stamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def journey_to_proto(row: JourneyRow, progress: tuple[int, int, bool] | None) -> jpb.Journey:
    """The ``Journey`` message of a stored journey version."""
    message = jpb.Journey(
        journey_id=str(row.journey_id),
        display_name=row.display_name,
        description=row.description,
        state=_STATES[row.state],
        version=row.version,
        active_version=row.active_version,
        draft=not row.version_activated,
        definition=jpb.JourneyDefinition.FromString(row.definition),
        create_time=_stamp(row.create_time),
        update_time=_stamp(row.update_time),
    )
    if progress is not None:
        message.audience.scanned, message.audience.entered, message.audience.done = progress
    return message


def _problem_to_proto(problem: Problem) -> pb.JourneyProblem:
    return pb.JourneyProblem(
        node_id=problem.node_id, field=problem.field, reason=problem.reason, message=problem.message
    )


def _outcome_status(outcome: str) -> status_pb2.Status:
    """A refused customer's ``google.rpc.Status``: the code, a message, and an ``ErrorInfo``
    whose reason is the outcome (``REENTRY_REFUSED``), as the runtime builds RPC errors."""
    reason, _, detail = outcome.partition(": ")
    error = _OUTCOME_ERRORS.get(reason, FailedPrecondition)(
        detail or _OUTCOME_MESSAGES.get(reason, reason), reason=reason
    )
    status: status_pb2.Status = to_status_proto(error, domain=_DOMAIN)
    return status


def state_to_proto(inst: Instance, path: list[StepRow] | None) -> pb.CustomerState:
    """The ``CustomerState`` of a customer's row (and path)."""
    message = pb.CustomerState(
        journey_id=str(inst.journey_id),
        user_id=str(inst.user_id),
        version=inst.version,
        node_id=inst.node_id,
        status=_STATUSES[inst.status],
        waiting_for=inst.waiting_for,
        wake_time=_stamp(inst.wake_at or inst.parked_wake_at) if inst.status == "waiting" else None,
        enter_time=_stamp(inst.enter_time),
        node_enter_time=_stamp(inst.node_enter_time),
        trigger_id=inst.trigger_id,
        visit=inst.visit,
    )
    for step in path or ():
        message.path.add(
            node_id=step.node_id,
            output=step.output,
            enter_time=_stamp(step.enter_time),
            exit_time=_stamp(step.exit_time),
        )
    return message


def _time(stamp: Timestamp, present: bool, field: str) -> datetime | None:
    return to_datetime(stamp, field) if present else None


class JourneyServicer(journey_service_pb2_grpc.JourneyServiceServicer):
    """Journeys, customers' journey state and statistics."""

    def __init__(
        self,
        ctx: ServiceContext,
        settings: JourneySettings,
        peers: Peers,
        catalog: Any,
        engine: Any,
    ) -> None:
        self._ctx = ctx
        self._settings = settings
        self._peers = peers
        self._catalog_ref = catalog
        self._engine_ref = engine

    @property
    def _catalog(self) -> Catalog:
        catalog: Catalog = self._catalog_ref()
        return catalog

    def _stepper(self) -> Stepper | None:
        engine: Engine | None = self._engine_ref()
        return engine.step_entered if engine is not None and self._settings.run_engine else None

    def _nudge(self) -> None:
        engine: Engine | None = self._engine_ref()
        if engine is not None:
            engine.nudge()

    async def _app(self, context: _Context) -> str:
        principal = require_scope(Scope.SERVER, Scope.ADMIN)
        if principal.app_id is None:
            raise PermissionDenied(
                "JourneyService works inside one app: call it with a server key of that app",
                reason="APP_KEY_REQUIRED",
            )
        return principal.app_id

    async def _journey_proto(self, app_id: str, row: JourneyRow) -> jpb.Journey:
        progress = None
        if row.active_version:
            progress = await journeys.audience_progress(
                self._ctx.pool, app_id, row.journey_id, row.active_version
            )
        return journey_to_proto(row, progress)

    # -- journeys -----------------------------------------------------------------------------

    async def CreateJourney(
        self, request: pb.CreateJourneyRequest, context: _Context
    ) -> jpb.Journey:
        """A new draft."""
        app_id = await self._app(context)
        row = await journeys.create(self._ctx.pool, app_id, request.journey, self._ctx.clock())
        return await self._journey_proto(app_id, row)

    async def GetJourney(self, request: pb.GetJourneyRequest, context: _Context) -> jpb.Journey:
        """One journey."""
        app_id = await self._app(context)
        journey_id = journeys.parse_journey_id(request.journey_id)
        row = await journeys.get(self._ctx.pool, app_id, journey_id, request.version)
        return await self._journey_proto(app_id, row)

    async def ListJourneys(
        self, request: pb.ListJourneysRequest, context: _Context
    ) -> pb.ListJourneysResponse:
        """A page of journeys."""
        app_id = await self._app(context)
        rows, token = await journeys.list_page(
            self._ctx.pool, app_id, request.page_size, request.page_token
        )
        return pb.ListJourneysResponse(
            journeys=[journey_to_proto(row, None) for row in rows], next_page_token=token
        )

    async def UpdateJourney(
        self, request: pb.UpdateJourneyRequest, context: _Context
    ) -> jpb.Journey:
        """Names and definition (a new draft version once one was activated)."""
        app_id = await self._app(context)
        row = await journeys.update(
            self._ctx.pool,
            app_id,
            request.journey,
            list(request.update_mask.paths),
            self._ctx.clock(),
        )
        return await self._journey_proto(app_id, row)

    async def DeleteJourney(
        self, request: pb.DeleteJourneyRequest, context: _Context
    ) -> empty_pb2.Empty:
        """Delete a draft or stopped journey."""
        app_id = await self._app(context)
        await journeys.delete(self._ctx.pool, app_id, journeys.parse_journey_id(request.journey_id))
        return empty_pb2.Empty()

    async def ValidateJourney(
        self, request: pb.ValidateJourneyRequest, context: _Context
    ) -> pb.ValidateJourneyResponse:
        """Every problem of the latest version."""
        app_id = await self._app(context)
        problems = await journeys.validate(
            self._ctx.pool,
            self._peers,
            app_id,
            journeys.parse_journey_id(request.journey_id),
            allow_private=self._settings.webhook_allow_private,
            check_templates=bool(self._settings.delivery_target),
        )
        return pb.ValidateJourneyResponse(
            valid=not problems, problems=[_problem_to_proto(p) for p in problems]
        )

    async def ActivateJourney(
        self, request: pb.ActivateJourneyRequest, context: _Context
    ) -> jpb.Journey:
        """Activate the latest version."""
        app_id = await self._app(context)
        row = await journeys.activate(
            self._ctx.pool,
            self._peers,
            app_id,
            journeys.parse_journey_id(request.journey_id),
            self._ctx.clock(),
            allow_private=self._settings.webhook_allow_private,
            check_templates=bool(self._settings.delivery_target),
        )
        self._catalog.invalidate()
        return await self._journey_proto(app_id, row)

    async def PauseJourney(self, request: pb.PauseJourneyRequest, context: _Context) -> jpb.Journey:
        """Pause."""
        app_id = await self._app(context)
        row = await journeys.pause(
            self._ctx.pool, app_id, journeys.parse_journey_id(request.journey_id), self._ctx.clock()
        )
        self._catalog.invalidate()
        return await self._journey_proto(app_id, row)

    async def ResumeJourney(
        self, request: pb.ResumeJourneyRequest, context: _Context
    ) -> jpb.Journey:
        """Resume."""
        app_id = await self._app(context)
        row = await journeys.resume(
            self._ctx.pool, app_id, journeys.parse_journey_id(request.journey_id), self._ctx.clock()
        )
        self._catalog.invalidate()
        self._nudge()
        return await self._journey_proto(app_id, row)

    async def StopJourney(self, request: pb.StopJourneyRequest, context: _Context) -> jpb.Journey:
        """Stop for good."""
        app_id = await self._app(context)
        row = await journeys.stop(
            self._ctx.pool, app_id, journeys.parse_journey_id(request.journey_id), self._ctx.clock()
        )
        self._catalog.invalidate()
        return await self._journey_proto(app_id, row)

    # -- customers ----------------------------------------------------------------------------

    async def AddCustomers(
        self, request: pb.AddCustomersRequest, context: _Context
    ) -> pb.AddCustomersResponse:
        """Enter customers by ref."""
        app_id = await self._app(context)
        results = await customers.add_customers(
            self._ctx.pool,
            self._peers,
            self._catalog,
            app_id,
            journeys.parse_journey_id(request.journey_id),
            list(request.customers),
            request.request_id,
            self._ctx.clock(),
            self._stepper(),
        )
        self._nudge()
        response = pb.AddCustomersResponse()
        for user_id, outcome in results:
            if outcome == "ENTERED":
                response.results.add(user_id=user_id, entered=True)
            else:
                response.results.add(user_id=user_id, error=_outcome_status(outcome))
        return response

    async def UploadCustomers(
        self, request_iterator: AsyncIterator[pb.UploadCustomersRequest], context: _Context
    ) -> pb.UploadCustomersResponse:
        """Enter the customers of a CSV file."""
        app_id = await self._app(context)
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "options":
            violations = FieldViolations()
            violations.add("options", "the first message carries the options", reason="REQUIRED")
            violations.raise_if_any()
        assert first is not None
        options = first.options

        async def chunks() -> AsyncIterator[bytes]:
            async for message in request_iterator:
                if message.WhichOneof("part") != "chunk":
                    raise InvalidArgument(
                        "only the first message carries options", reason="OPTIONS_REPEATED"
                    )
                yield message.chunk

        result = await customers.upload_customers(
            self._ctx.pool,
            self._peers,
            self._catalog,
            app_id,
            journeys.parse_journey_id(options.journey_id, "options.journey_id"),
            options.id_column,
            options.id_kind,
            options.request_id,
            chunks(),
            self._ctx.clock(),
            self._stepper(),
        )
        self._nudge()
        return pb.UploadCustomersResponse(
            rows=result.rows,
            entered=result.entered,
            rejected=result.rejected,
            rejections=[
                pb.UploadRejection(line=line, reason=reason)
                for line, reason in result.rejections or []
            ],
        )

    async def GetCustomerState(
        self, request: pb.GetCustomerStateRequest, context: _Context
    ) -> pb.CustomerState:
        """A customer's state with their path."""
        app_id = await self._app(context)
        journey_id = journeys.parse_journey_id(request.journey_id)
        user_id = await customers.resolve_user(self._peers, app_id, request.customer)
        inst, path = await customers.get_state(self._ctx.pool, app_id, journey_id, user_id)
        return state_to_proto(inst, path)

    async def ListCustomerStates(
        self, request: pb.ListCustomerStatesRequest, context: _Context
    ) -> pb.ListCustomerStatesResponse:
        """A page of states."""
        app_id = await self._app(context)
        rows, token = await customers.list_states(
            self._ctx.pool,
            app_id,
            journeys.parse_journey_id(request.journey_id),
            request.node_id,
            request.page_size,
            request.page_token,
        )
        return pb.ListCustomerStatesResponse(
            states=[state_to_proto(row, None) for row in rows], next_page_token=token
        )

    async def PutCustomerState(
        self, request: pb.PutCustomerStateRequest, context: _Context
    ) -> pb.CustomerState:
        """Move a customer to a node."""
        app_id = await self._app(context)
        journey_id = journeys.parse_journey_id(request.journey_id)
        user_id = await customers.resolve_user(self._peers, app_id, request.customer)
        await customers.put_state(
            self._ctx.pool,
            self._catalog,
            app_id,
            journey_id,
            user_id,
            request.node_id,
            self._ctx.clock(),
        )
        self._nudge()
        inst, path = await customers.get_state(self._ctx.pool, app_id, journey_id, user_id)
        return state_to_proto(inst, path)

    async def DeleteCustomerState(
        self, request: pb.DeleteCustomerStateRequest, context: _Context
    ) -> empty_pb2.Empty:
        """Take a customer out."""
        app_id = await self._app(context)
        journey_id = journeys.parse_journey_id(request.journey_id)
        user_id = await customers.resolve_user(self._peers, app_id, request.customer)
        await customers.delete_state(self._ctx.pool, app_id, journey_id, user_id, self._ctx.clock())
        return empty_pb2.Empty()

    # -- statistics ---------------------------------------------------------------------------

    async def GetJourneyStats(
        self, request: pb.GetJourneyStatsRequest, context: _Context
    ) -> pb.JourneyStats:
        """Per-node statistics over a time range."""
        app_id = await self._app(context)
        start = _time(request.start_time, request.HasField("start_time"), "start_time")
        end = _time(request.end_time, request.HasField("end_time"), "end_time")
        if start is not None and end is not None and end <= start:
            violations = FieldViolations()
            violations.add("end_time", "must be after start_time")
            violations.raise_if_any()
        counts = await stats.journey_stats(
            self._ctx.pool, app_id, journeys.parse_journey_id(request.journey_id), start, end
        )
        response = pb.JourneyStats(
            entered=counts.entered,
            entries_refused=counts.refused,
            converted=counts.converted,
            conversion_rate=counts.conversion_rate,
            active=counts.active,
        )
        for n in counts.nodes:
            response.nodes.add(
                node_id=n.node_id,
                entered=n.entered,
                exited=n.exited,
                waiting=n.waiting,
                sent=n.sent,
                delivered=n.delivered,
                opened=n.opened,
                clicked=n.clicked,
                failed=n.failed,
                converted=n.converted,
                outputs=[pb.OutputStats(output=k, count=v) for k, v in sorted(n.outputs.items())],
            )
        return response


_ = uuid
