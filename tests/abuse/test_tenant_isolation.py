"""Tenant isolation: app A's keys with app B's ids, on every RPC of every service.

App B owns a canary-carrying object of every kind (tests/abuse/world.py). Each RPC is called by
app A's server key (and, on a client key's allowance, A's client key too) with a request naming
B's objects. The table below has one request per RPC, and a test asserts it covers exactly the
RPCs of the descriptors, so a new RPC fails the suite until it is given one.

Expectations:
    NOT_FOUND   the request names B's objects: they do not exist for A (never PERMISSION_DENIED,
                which would confirm they exist); batch RPCs answer per item with NOT_FOUND
    REF         B's id is a reference inside a create/send body: NOT_FOUND or INVALID_ARGUMENT
                naming the field
    ROWS_REJECTED  an upload naming B's users: every row rejected, nothing created or updated
    DRAFT       a draft journey naming B's template is A's own; activating it is refused
    OWN         the request names nothing of B's (creates, lists): answered for A alone
    ADMIN_ONLY  AppsService: the app key is PERMISSION_DENIED whatever the ids
Every answer (message, details, responses, streams) is collected and must not contain B's
canary; after all calls, B's objects are all still there, unchanged. And every answer about B's
ids must be the answer A gets for ids that never existed (the same status, reason and per-item
statuses): nothing tells A that B's object exists.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from tidings.delivery.v1 import broadcast_pb2, channel_pb2, template_pb2
from tidings.delivery.v1 import delivery_service_pb2 as dpb
from tidings.identity.v1 import customer_field_pb2, segment_pb2
from tidings.identity.v1 import subscription_pb2 as spb
from tidings.journey.v1 import journey_pb2 as jpb

from tests.abuse.conftest import Stack
from tests.abuse.rpc import M, Outcome, all_methods, invoke, method_name
from tests.abuse.world import World, build_world
from tests.delivery.sink import Sink
from tests.delivery.support import by_id, struct
from tests.identity.conftest import TestApp, create_test_app
from tests.identity.import_support import USER_ID, options, standard
from tests.journey.support import definition, exit_node, send

NOT_FOUND, REF, ROWS_REJECTED, DRAFT, OWN, ADMIN_ONLY = (
    "NOT_FOUND",
    "REF",
    "ROWS_REJECTED",
    "DRAFT",
    "OWN",
    "ADMIN_ONLY",
)
CLIENT_ALLOWED = frozenset(
    {
        "IdentityService.CreateSubscription",
        "IdentityService.UpdateSubscription",
        "IdentityService.TrackEvents",
        "DeliveryService.ReportEngagement",
        "DeliveryService.ListInAppMessages",
    }
)

Build = Callable[[World], Message | list[Message]]


def _user(w: World) -> Any:
    return by_id(w.user_id)


def _b_spec(w: World) -> Any:
    return {"options": [{"channel": channel_pb2.CHANNEL_WEBHOOK, "template_id": w.template_id}]}


def _member_of(w: World) -> segment_pb2.Condition:
    return segment_pb2.Condition(member_of=segment_pb2.MembershipCondition(segment_id=w.segment_id))


def _import(w: World) -> list[Message]:
    return [
        M.ImportUsersRequest(
            options=options(standard("first_name"), id_column="id", identifier_kind=USER_ID)
        ),
        M.ImportUsersRequest(chunk=f"id,first_name\r\n{w.user_id},overwritten\r\n".encode()),
    ]


def _broadcast_csv(w: World) -> list[Message]:
    return [
        M.BroadcastCsvRequest(
            options=M.BroadcastCsvOptions(
                broadcast=broadcast_pb2.Broadcast(spec=_b_spec(w)), ref_column="user_id"
            )
        ),
        M.BroadcastCsvRequest(chunk=f"user_id\n{w.user_id}\n".encode()),
    ]


def _upload_customers(w: World) -> list[Message]:
    return [
        M.UploadCustomersRequest(
            options=M.UploadCustomersOptions(journey_id=w.journey_id, id_column="user_id")
        ),
        M.UploadCustomersRequest(chunk=f"user_id\n{w.user_id}\n".encode()),
    ]


#: One request per RPC naming B's objects, and what A must get.
TABLE: dict[str, tuple[str, Build]] = {
    # -- AppsService: admin only -----------------------------------------------------------------
    "AppsService.CreateApp": (ADMIN_ONLY, lambda w: M.CreateAppRequest()),
    "AppsService.GetApp": (ADMIN_ONLY, lambda w: M.GetAppRequest(app_id=w.app.app_id)),
    "AppsService.ListApps": (ADMIN_ONLY, lambda w: M.ListAppsRequest()),
    "AppsService.UpdateApp": (
        ADMIN_ONLY,
        lambda w: M.UpdateAppRequest(app={"app_id": w.app.app_id}),
    ),
    "AppsService.CreateApiKey": (
        ADMIN_ONLY,
        lambda w: M.CreateApiKeyRequest(app_id=w.app.app_id, scope=1),
    ),
    "AppsService.ListApiKeys": (
        ADMIN_ONLY,
        lambda w: M.ListApiKeysRequest(app_id=w.app.app_id),
    ),
    "AppsService.RevokeApiKey": (
        ADMIN_ONLY,
        lambda w: M.RevokeApiKeyRequest(app_id=w.app.app_id, key_id="k"),
    ),
    "AppsService.AuthenticateKey": (
        ADMIN_ONLY,
        lambda w: M.AuthenticateKeyRequest(secret=w.app.server_key),
    ),
    # -- IdentityService -----------------------------------------------------------------------
    "IdentityService.UpsertUser": (
        NOT_FOUND,
        lambda w: M.UpsertUserRequest(ref=_user(w), user={"first_name": "overwritten"}),
    ),
    "IdentityService.BatchUpsertUsers": (
        NOT_FOUND,
        lambda w: M.BatchUpsertUsersRequest(
            requests=[M.UpsertUserRequest(ref=_user(w), user={"first_name": "overwritten"})]
        ),
    ),
    "IdentityService.GetUser": (NOT_FOUND, lambda w: M.GetUserRequest(ref=_user(w))),
    "IdentityService.BatchGetUsers": (NOT_FOUND, lambda w: M.BatchGetUsersRequest(refs=[_user(w)])),
    "IdentityService.ListUsers": (OWN, lambda w: M.ListUsersRequest()),
    "IdentityService.DeleteUser": (NOT_FOUND, lambda w: M.DeleteUserRequest(ref=_user(w))),
    "IdentityService.ExportUser": (NOT_FOUND, lambda w: M.ExportUserRequest(ref=_user(w))),
    "IdentityService.AddAlias": (
        NOT_FOUND,
        lambda w: M.AddAliasRequest(ref=_user(w), alias={"label": "crm2", "value": "v"}),
    ),
    "IdentityService.RemoveAlias": (
        NOT_FOUND,
        lambda w: M.RemoveAliasRequest(ref=_user(w), label="crm"),
    ),
    # Field names are per app: A may define the same name (an ALREADY_EXISTS would leak B's).
    "IdentityService.CreateCustomerField": (
        OWN,
        lambda w: M.CreateCustomerFieldRequest(
            field=customer_field_pb2.CustomerField(
                name=w.field_name, type=customer_field_pb2.FIELD_TYPE_STRING
            )
        ),
    ),
    "IdentityService.ListCustomerFields": (OWN, lambda w: M.ListCustomerFieldsRequest()),
    # A's own field of that name (CreateCustomerField above defined it): B's is untouched.
    "IdentityService.UpdateCustomerField": (
        OWN,
        lambda w: M.UpdateCustomerFieldRequest(
            field=customer_field_pb2.CustomerField(name=w.field_name, description="A's"),
            update_mask={"paths": ["description"]},
        ),
    ),
    "IdentityService.CreateSubscription": (
        NOT_FOUND,
        lambda w: M.CreateSubscriptionRequest(
            subscription=spb.Subscription(
                type=spb.SUBSCRIPTION_TYPE_EMAIL, token=f"a-{uuid.uuid4().hex[:8]}@example.com"
            ),
            user=_user(w),
        ),
    ),
    "IdentityService.UpdateSubscription": (
        NOT_FOUND,
        lambda w: M.UpdateSubscriptionRequest(
            subscription=spb.Subscription(
                subscription_id=w.subscription_id, opt_in=spb.OPT_IN_STATE_UNSUBSCRIBED
            ),
            update_mask={"paths": ["opt_in"]},
        ),
    ),
    "IdentityService.GetSubscription": (
        NOT_FOUND,
        lambda w: M.GetSubscriptionRequest(subscription_id=w.subscription_id),
    ),
    "IdentityService.DeleteSubscription": (
        NOT_FOUND,
        lambda w: M.DeleteSubscriptionRequest(subscription_id=w.subscription_id),
    ),
    "IdentityService.AssignSubscription": (
        NOT_FOUND,
        lambda w: M.AssignSubscriptionRequest(subscription_id=w.subscription_id, user=_user(w)),
    ),
    "IdentityService.UnassignSubscription": (
        NOT_FOUND,
        lambda w: M.UnassignSubscriptionRequest(subscription_id=w.subscription_id),
    ),
    "IdentityService.Login": (
        NOT_FOUND,
        lambda w: M.LoginRequest(subscription_id=w.subscription_id, external_id="someone"),
    ),
    "IdentityService.Logout": (
        NOT_FOUND,
        lambda w: M.LogoutRequest(subscription_id=w.subscription_id),
    ),
    "IdentityService.TrackEvents": (
        NOT_FOUND,
        lambda w: M.TrackEventsRequest(events=[M.TrackedEventInput(user=_user(w), name="probe")]),
    ),
    "IdentityService.ListEvents": (NOT_FOUND, lambda w: M.ListEventsRequest(user=_user(w))),
    "IdentityService.ImportUsers": (ROWS_REJECTED, _import),
    "IdentityService.GetImportJob": (
        NOT_FOUND,
        lambda w: M.GetImportJobRequest(import_id=w.import_id),
    ),
    "IdentityService.ListImportJobs": (OWN, lambda w: M.ListImportJobsRequest()),
    "IdentityService.ExportImportRejections": (
        NOT_FOUND,
        lambda w: M.ExportImportRejectionsRequest(import_id=w.import_id),
    ),
    "IdentityService.CreateSegment": (
        REF,
        lambda w: M.CreateSegmentRequest(
            segment=segment_pb2.Segment(display_name="probe", condition=_member_of(w))
        ),
    ),
    "IdentityService.GetSegment": (
        NOT_FOUND,
        lambda w: M.GetSegmentRequest(segment_id=w.segment_id),
    ),
    "IdentityService.ListSegments": (OWN, lambda w: M.ListSegmentsRequest()),
    "IdentityService.UpdateSegment": (
        NOT_FOUND,
        lambda w: M.UpdateSegmentRequest(
            segment=segment_pb2.Segment(segment_id=w.segment_id, display_name="overwritten"),
            update_mask={"paths": ["display_name"]},
        ),
    ),
    "IdentityService.DeleteSegment": (
        NOT_FOUND,
        lambda w: M.DeleteSegmentRequest(segment_id=w.segment_id),
    ),
    "IdentityService.CountSegment": (
        NOT_FOUND,
        lambda w: M.CountSegmentRequest(segment_id=w.segment_id),
    ),
    "IdentityService.ListSegmentMembers": (
        NOT_FOUND,
        lambda w: M.ListSegmentMembersRequest(segment_id=w.segment_id),
    ),
    "IdentityService.ExplainSegmentMembership": (
        NOT_FOUND,
        lambda w: M.ExplainSegmentMembershipRequest(segment_id=w.segment_id, user=_user(w)),
    ),
    "IdentityService.GetSegmentMembership": (
        NOT_FOUND,
        lambda w: M.GetSegmentMembershipRequest(segment_id=w.segment_id, user=_user(w)),
    ),
    # -- DeliveryService -----------------------------------------------------------------------
    "DeliveryService.CreateTemplate": (
        OWN,
        lambda w: M.CreateTemplateRequest(
            template=template_pb2.Template(
                display_name="mine",
                channel=channel_pb2.CHANNEL_WEBHOOK,
                content=template_pb2.MessageContent(
                    webhook=template_pb2.WebhookContent(
                        method="POST", url="https://example.com/x", body="{}"
                    )
                ),
            )
        ),
    ),
    "DeliveryService.GetTemplate": (
        NOT_FOUND,
        lambda w: M.GetTemplateRequest(template_id=w.template_id),
    ),
    "DeliveryService.ListTemplates": (OWN, lambda w: M.ListTemplatesRequest()),
    "DeliveryService.UpdateTemplate": (
        NOT_FOUND,
        lambda w: M.UpdateTemplateRequest(
            template=template_pb2.Template(template_id=w.template_id, display_name="overwritten"),
            update_mask={"paths": ["display_name"]},
        ),
    ),
    "DeliveryService.DeleteTemplate": (
        NOT_FOUND,
        lambda w: M.DeleteTemplateRequest(template_id=w.template_id),
    ),
    "DeliveryService.ListTemplateVersions": (
        NOT_FOUND,
        lambda w: M.ListTemplateVersionsRequest(template_id=w.template_id),
    ),
    "DeliveryService.RenderPreview": (
        NOT_FOUND,
        lambda w: M.RenderPreviewRequest(
            user=_user(w),
            option={"channel": channel_pb2.CHANNEL_WEBHOOK, "template_id": w.template_id},
        ),
    ),
    # Channel configs are keyed by channel within the caller's app: A has no webhook channel.
    "DeliveryService.GetChannelConfig": (
        NOT_FOUND,
        lambda w: M.GetChannelConfigRequest(channel=channel_pb2.CHANNEL_WEBHOOK),
    ),
    "DeliveryService.ListChannelConfigs": (OWN, lambda w: M.ListChannelConfigsRequest()),
    "DeliveryService.DeleteChannelConfig": (
        NOT_FOUND,
        lambda w: M.DeleteChannelConfigRequest(channel=channel_pb2.CHANNEL_WEBHOOK),
    ),
    "DeliveryService.UpdateChannelConfig": (
        OWN,
        lambda w: M.UpdateChannelConfigRequest(
            channel_config=channel_pb2.ChannelConfig(
                channel=channel_pb2.CHANNEL_WEBHOOK,
                credentials=struct({"signing_secret": "a-own-signing-secret-0123"}),
            )
        ),
    ),
    "DeliveryService.GetDeliverySettings": (OWN, lambda w: M.GetDeliverySettingsRequest()),
    "DeliveryService.UpdateDeliverySettings": (
        OWN,
        lambda w: M.UpdateDeliverySettingsRequest(settings={}, update_mask={"paths": []}),
    ),
    "DeliveryService.Send": (
        REF,
        lambda w: M.SendRequest(users=[_user(w)], spec=_b_spec(w)),
    ),
    "DeliveryService.Broadcast": (
        REF,
        lambda w: M.BroadcastRequest(
            broadcast=broadcast_pb2.Broadcast(
                audience=broadcast_pb2.Audience(segment_id=w.segment_id), spec=_b_spec(w)
            )
        ),
    ),
    "DeliveryService.BroadcastCsv": (REF, _broadcast_csv),
    "DeliveryService.GetBroadcast": (
        NOT_FOUND,
        lambda w: M.GetBroadcastRequest(broadcast_id=w.broadcast_id),
    ),
    "DeliveryService.ListBroadcasts": (OWN, lambda w: M.ListBroadcastsRequest()),
    "DeliveryService.CancelBroadcast": (
        NOT_FOUND,
        lambda w: M.CancelBroadcastRequest(broadcast_id=w.broadcast_id),
    ),
    "DeliveryService.GetMessage": (
        NOT_FOUND,
        lambda w: M.GetMessageRequest(message_id=w.message_id),
    ),
    "DeliveryService.ListMessages": (NOT_FOUND, lambda w: M.ListMessagesRequest(user=_user(w))),
    "DeliveryService.ReportEngagement": (
        NOT_FOUND,
        lambda w: M.ReportEngagementRequest(
            message_id=w.message_id,
            subscription_id=w.subscription_id,
            kind=dpb.ENGAGEMENT_KIND_CLICKED,
        ),
    ),
    "DeliveryService.ListInAppMessages": (
        NOT_FOUND,
        lambda w: M.ListInAppMessagesRequest(subscription_id=w.subscription_id),
    ),
    # -- JourneyService ------------------------------------------------------------------------
    "JourneyService.CreateJourney": (
        DRAFT,
        lambda w: M.CreateJourneyRequest(
            journey=jpb.Journey(
                display_name="probe",
                definition=definition(
                    send("s", w.template_id, ("webhook",), next="end"), exit_node("end")
                ),
            )
        ),
    ),
    "JourneyService.GetJourney": (
        NOT_FOUND,
        lambda w: M.GetJourneyRequest(journey_id=w.journey_id),
    ),
    "JourneyService.ListJourneys": (OWN, lambda w: M.ListJourneysRequest()),
    "JourneyService.UpdateJourney": (
        NOT_FOUND,
        lambda w: M.UpdateJourneyRequest(
            journey=jpb.Journey(journey_id=w.journey_id, display_name="overwritten"),
            update_mask={"paths": ["display_name"]},
        ),
    ),
    "JourneyService.DeleteJourney": (
        NOT_FOUND,
        lambda w: M.DeleteJourneyRequest(journey_id=w.journey_id),
    ),
    "JourneyService.ValidateJourney": (
        NOT_FOUND,
        lambda w: M.ValidateJourneyRequest(journey_id=w.journey_id),
    ),
    "JourneyService.ActivateJourney": (
        NOT_FOUND,
        lambda w: M.ActivateJourneyRequest(journey_id=w.journey_id),
    ),
    "JourneyService.PauseJourney": (
        NOT_FOUND,
        lambda w: M.PauseJourneyRequest(journey_id=w.journey_id),
    ),
    "JourneyService.ResumeJourney": (
        NOT_FOUND,
        lambda w: M.ResumeJourneyRequest(journey_id=w.journey_id),
    ),
    "JourneyService.StopJourney": (
        NOT_FOUND,
        lambda w: M.StopJourneyRequest(journey_id=w.journey_id),
    ),
    "JourneyService.AddCustomers": (
        NOT_FOUND,
        lambda w: M.AddCustomersRequest(journey_id=w.journey_id, customers=[_user(w)]),
    ),
    "JourneyService.UploadCustomers": (NOT_FOUND, _upload_customers),
    "JourneyService.GetCustomerState": (
        NOT_FOUND,
        lambda w: M.GetCustomerStateRequest(journey_id=w.journey_id, customer=_user(w)),
    ),
    "JourneyService.ListCustomerStates": (
        NOT_FOUND,
        lambda w: M.ListCustomerStatesRequest(journey_id=w.journey_id),
    ),
    "JourneyService.PutCustomerState": (
        NOT_FOUND,
        lambda w: M.PutCustomerStateRequest(
            journey_id=w.journey_id, customer=_user(w), node_id="end"
        ),
    ),
    "JourneyService.DeleteCustomerState": (
        NOT_FOUND,
        lambda w: M.DeleteCustomerStateRequest(journey_id=w.journey_id, customer=_user(w)),
    ),
    "JourneyService.GetJourneyStats": (
        NOT_FOUND,
        lambda w: M.GetJourneyStatsRequest(journey_id=w.journey_id),
    ),
}

#: Defects found by this suite, per RPC (xfail strict: fixing one turns its case green).
KNOWN_DEFECTS: dict[str, str] = {}


@dataclass
class Scene:
    stack: Stack
    world: World
    a: TestApp
    sink: Sink
    seen: list[str]
    ghost: World


@pytest.fixture(scope="module")
async def scene(stack: Stack) -> AsyncIterator[Scene]:
    async with Sink() as sink:
        world = await build_world(stack, sink)
        a = await create_test_app(stack.apps)
        yield Scene(stack, world, a, sink, [], ghost_of(world))


def ghost_of(world: World) -> World:
    """B's world with every id replaced by one that never existed (same shapes)."""
    return World(
        app=world.app,
        canary=world.canary,
        user_id=str(uuid.uuid4()),
        external_id=f"ext-{uuid.uuid4().hex}",
        subscription_id=str(uuid.uuid4()),
        field_name=world.field_name,
        segment_id=str(uuid.uuid4()),
        import_id=str(uuid.uuid4()),
        template_id=str(uuid.uuid4()),
        message_id=str(uuid.uuid4()),
        broadcast_id=str(uuid.uuid4()),
        journey_id=str(uuid.uuid4()),
    )


def _item_errors(outcome: Outcome) -> list[int]:
    """Per-item status codes of a batch answer (results[].error), in order."""
    codes = []
    for response in outcome.responses:
        for result in getattr(response, "results", []):
            error = getattr(result, "error", None)
            codes.append(int(error.code) if error is not None else 0)
    return codes


def _signature(outcome: Outcome) -> tuple[str, str, list[int]]:
    """What must not differ between B's ids and ids that never existed."""
    return outcome.code.name, outcome.reason, _item_errors(outcome)


def _judge(expected: str, outcome: Outcome) -> str | None:
    """Why ``outcome`` is wrong for ``expected`` (a server key), or None."""
    code, items = outcome.code, _item_errors(outcome)
    not_found = grpc.StatusCode.NOT_FOUND
    if expected == ADMIN_ONLY:
        ok = code == grpc.StatusCode.PERMISSION_DENIED
    elif expected in (OWN, DRAFT):
        ok = code == grpc.StatusCode.OK
    elif expected == ROWS_REJECTED:
        job: Any = outcome.responses[0] if outcome.responses else None
        ok = code == grpc.StatusCode.OK and (job.rows, job.created, job.updated) == (
            job.rejected,
            0,
            0,
        )
    else:
        ok = code == not_found or (
            code == grpc.StatusCode.OK
            and bool(items)
            and all(item == not_found.value[0] for item in items)
        )
        if expected == REF and code == grpc.StatusCode.INVALID_ARGUMENT:
            ok = "_id" in outcome.message
    return None if ok else f"expected {expected}, got {outcome}"


METHODS = {method_name(m): m for m in all_methods()}


def test_the_table_covers_every_rpc() -> None:
    assert set(TABLE) == set(METHODS)


def _case(name: str) -> Any:
    marks = (
        [pytest.mark.xfail(strict=True, raises=AssertionError, reason=KNOWN_DEFECTS[name])]
        if name in KNOWN_DEFECTS
        else []
    )
    return pytest.param(name, id=name, marks=marks)


@pytest.mark.parametrize("name", [_case(n) for n in sorted(METHODS)])
async def test_other_apps_ids(scene: Scene, name: str) -> None:
    method = METHODS[name]
    expected, build = TABLE[name]
    channel = scene.stack.channel_of(method.containing_service.full_name)
    keys = [("server", scene.a.server)]
    if name in CLIENT_ALLOWED:
        keys.append(("client", scene.a.client))
    for who, key in keys:
        outcome = await invoke(channel, method, build(scene.world), key)
        scene.seen.append(outcome.text())
        assert scene.world.canary not in outcome.text(), f"{name} leaked B's canary: {outcome}"
        if who == "server":
            problem = _judge(expected, outcome)
            assert problem is None, f"{name} ({who} key): {problem}"
        if expected in (OWN, ADMIN_ONLY):
            continue
        ghost = await invoke(channel, method, build(scene.ghost), key)
        assert _signature(outcome) == _signature(ghost), (
            f"{name} ({who} key) tells B's ids from ids that never existed: {outcome} vs {ghost}"
        )
        if expected == DRAFT:
            draft: Any = outcome.responses[0]
            activated = await invoke(
                channel,
                METHODS["JourneyService.ActivateJourney"],
                M.ActivateJourneyRequest(journey_id=draft.journey_id),
                key,
            )
            scene.seen.append(activated.text())
            assert activated.code in (
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND,
            ), f"A activated a journey sending B's template: {activated}"


async def test_zz_b_is_intact_and_nothing_leaked(scene: Scene) -> None:
    """After every call: B still has everything, unchanged, and no answer carried the canary."""
    assert len(scene.seen) >= len(METHODS)
    assert not [text for text in scene.seen if scene.world.canary in text]
    stack, w, b = scene.stack, scene.world, scene.world.app
    user = await stack.users.GetUser(M.GetUserRequest(ref=_user(w)), metadata=b.server)
    assert user.first_name == w.canary
    assert [a.value for a in user.aliases if a.label == "crm"] == [w.canary]
    sub = await stack.users.GetSubscription(
        M.GetSubscriptionRequest(subscription_id=w.subscription_id), metadata=b.server
    )
    assert sub.opt_in == spb.OPT_IN_STATE_SUBSCRIBED
    segment = await stack.users.GetSegment(
        M.GetSegmentRequest(segment_id=w.segment_id), metadata=b.server
    )
    assert segment.display_name == w.canary
    template = await stack.deliveries.GetTemplate(
        M.GetTemplateRequest(template_id=w.template_id), metadata=b.server
    )
    assert template.display_name == w.canary
    config = await stack.deliveries.GetChannelConfig(
        M.GetChannelConfigRequest(channel=channel_pb2.CHANNEL_WEBHOOK), metadata=b.server
    )
    assert config.channel == channel_pb2.CHANNEL_WEBHOOK
    journey = await stack.journeys.GetJourney(
        M.GetJourneyRequest(journey_id=w.journey_id), metadata=b.server
    )
    assert (journey.display_name, journey.state) == (w.canary, jpb.Journey.STATE_ACTIVE)
    await stack.journeys.GetCustomerState(
        M.GetCustomerStateRequest(journey_id=w.journey_id, customer=_user(w)),
        metadata=b.server,
    )
    broadcast = await stack.deliveries.GetBroadcast(
        M.GetBroadcastRequest(broadcast_id=w.broadcast_id), metadata=b.server
    )
    assert broadcast.state != broadcast_pb2.Broadcast.STATE_CANCELLED
