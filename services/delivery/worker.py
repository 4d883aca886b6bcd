"""The delivery worker: consumes ``delivery.requests`` in batches and sends each message once.

Per polled batch (records of many users and apps):

1. Records of apps this deployment does not know are skipped. Each record's message row is
   read: only a record whose dispatch is the row's current one and whose row is ``queued``
   goes on, or a first dispatch with no row yet (broadcast and journey records: their row is
   written once, when decided). A redelivered record, a stale dispatch, or a message another
   worker already took does nothing.
2. Recipients are resolved with one identity ``BatchGetUsers`` per app (not per message), right
   before sending. Sends that wait (rate limits, a full window) would use an old read: before
   each claim group that waited for rate-limit tokens or whose profiles are older than
   ``_PROFILE_MAX_AGE``, the group's recipients are read again (one ``BatchGetUsers`` per
   group) and their targets re-checked, so an unsubscribe or erasure committed before the
   claim wins.
3. Policy (:mod:`services.delivery.policy`) decides send, defer or fail; templates render.
   Fails and defers are recorded (timeline, receipt, ledger) in one transaction.
4. Sends go through a window per channel (the concurrency, capped by the adapter's connection
   pool): a row is moved to ``sending`` (or created ``sending``, unique by message id and
   idempotency key, so only one worker's insert wins) and committed only when a slot is free
   for its call, and the call starts right after — the ledger row is written before the
   provider call, and a claimed row is a call in flight. Outcomes are recorded in groups.
   Each claim carries this worker's lease (:mod:`services.delivery.leases`). A worker killed
   between claim and record leaves ``sending`` rows that no record acts on again; once its
   lease is gone the scheduler resends them with the same key on channels whose receiver drops
   a repeat (webhooks, APNs: ``RESEND_SAFE``) and fails them OUTCOME_UNKNOWN elsewhere. A call
   whose answer was lost after it went out (``maybe_delivered``) follows the same rule. A
   recording that fails is retried (it is idempotent); one that keeps failing releases the
   lease, so its rows are settled like a dead worker's instead of staying ``sending``.
5. RETRY outcomes are parked (``retry_wait``) with exponential backoff and jitter, honouring
   Retry-After; the scheduler puts them back on the topic as the next dispatch. After
   ``max_attempts`` provider calls the message fails (RETRIES_EXHAUSTED) and is dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import Counter, Histogram
from tidings.delivery.v1 import message_pb2, template_pb2
from tidings.events.v1.dead_letter_pb2 import DeadLetter
from tidings.events.v1.send_request_pb2 import SendRequest
from tidings.identity.v1 import user_pb2, user_ref_pb2

from services.delivery import app_settings, channels, messages_store, policy
from services.delivery.broadcasts_store import BroadcastDeltas, apply_deltas, load_broadcast_specs
from services.delivery.channel_configs import ChannelConfig, load_configs
from services.delivery.content import to_outbound_content
from services.delivery.identity_client import IdentityClient
from services.delivery.jobs import Job, record_key, spec_of, with_record_data
from services.delivery.leases import Lease
from services.delivery.messages_store import Claim, Finish, NewMessage, Park
from services.delivery.providers.base import (
    RESEND_SAFE,
    Channel,
    OutboundMessage,
    Outcome,
    ProviderResult,
    Recipient,
)
from services.delivery.providers.registry import Adapters
from services.delivery.rate_limit import RateLimits
from services.delivery.receipts import Fact, record_facts
from services.delivery.render import RenderContext, RenderError, render_content, struct_variables
from services.delivery.secrets_box import SecretBox
from services.delivery.settings import DeliverySettings
from services.delivery.templates import choose_content, load_templates
from services.delivery.tracking import TrackingLinks, rewrite_html
from services.runtime import outbox
from services.runtime.app import Clock, ServiceContext
from services.runtime.kafka import DEAD_LETTERS, Record

__all__ = ["Worker"]

log = logging.getLogger(__name__)

S = message_pb2
_STATUS_QUEUED = S.MESSAGE_STATUS_QUEUED
_STATUS_DEFERRED = S.MESSAGE_STATUS_DEFERRED
_STATUS_SENT = S.MESSAGE_STATUS_SENT
_STATUS_FAILED = S.MESSAGE_STATUS_FAILED
#: A rate-limited channel's chunk holds about this many seconds of its calls.
_CHUNK_SECONDS = 10.0
#: A rate-limited channel's claim group holds at most this many seconds of its calls, so its
#: calls reach the provider spread at the rate, not in bursts of a window.
_RATE_GROUP_SECONDS = 0.1
#: Profiles older than this (seconds) are read again before their claim.
_PROFILE_MAX_AGE = 1.0
#: Recording provider answers is tried this often, waiting 0.2 s doubling to 2 s in between
#: (about 4 s in all) before the rows are given up to the scheduler.
_RECORD_ATTEMPTS = 5
_RECORD_BACKOFF = 0.2
_RECORD_BACKOFF_MAX = 2.0


@dataclass(slots=True)
class _Fail:
    reason: str
    detail: str = ""
    channel: str = ""


@dataclass(slots=True)
class _Defer:
    due_at: datetime
    reason: str
    detail: str = ""
    channel: str = ""


@dataclass(slots=True)
class _Send:
    target: policy.Target
    template_id: str
    template_version: int
    content: template_pb2.MessageContent
    counts_for_cap: bool


_Decision = _Fail | _Defer | _Send


@dataclass(slots=True)
class _Item:
    """One active job with what the worker learnt about it."""

    job: Job
    spec: message_pb2.MessageSpec | None
    #: No ledger row yet: the outcome or the claim creates it.
    new: bool = False
    user: user_pb2.User | None = None
    #: When ``user`` was read (time.monotonic()).
    read_at: float = 0.0
    decision: _Decision | None = None


def _metrics(ctx: ServiceContext) -> tuple[Counter, Histogram]:
    registry = ctx.metrics.registry
    outcomes = Counter(
        "delivery_messages_total",
        "Messages the workers finished, by outcome (sent, failed, deferred, retry, skipped).",
        ["outcome"],
        registry=registry,
    )
    calls = Histogram(
        "delivery_provider_call_seconds",
        "Provider call latency, by channel.",
        ["channel"],
        registry=registry,
    )
    return outcomes, calls


class Worker:
    """Handles batches of ``delivery.requests`` records (see the module docstring).

    Args:
        ctx: The service context (pool, clock, metrics).
        settings: Delivery settings (batch sizes, retries).
        identity: The identity client.
        adapters: Provider adapters by channel.
        box: Opens stored credentials.
        links: Tracking links for emails.
    """

    def __init__(
        self,
        ctx: ServiceContext,
        settings: DeliverySettings,
        identity: IdentityClient,
        adapters: Adapters,
        box: SecretBox,
        links: TrackingLinks,
    ) -> None:
        self._ctx = ctx
        self._settings = settings
        self._identity = identity
        self._adapters = adapters
        self._box = box
        self._links = links
        self._limits = RateLimits()
        self._outcomes, self._call_seconds = _metrics(ctx)
        self._known: set[str] = set()
        self._lease = Lease(settings.database_url)

    def set_partitions(self, owned: int, total: int) -> None:
        """This worker now owns ``owned`` of the ``total`` partitions of ``delivery.requests``:
        it takes that share of every rate limit (called on each consumer-group rebalance)."""
        self._limits.set_share(owned, total)
        log.info(
            "worker owns %d of %d partitions: %.0f%% of each rate limit",
            owned,
            total,
            self._limits.share * 100,
        )

    async def close(self) -> None:
        """Release the lease (the consumer has stopped: no claim of ours is pending)."""
        await self._lease.close()

    @property
    def _clock(self) -> Clock:
        return self._ctx.clock

    async def _known_apps(self, app_ids: set[str]) -> set[str]:
        """Which apps this deployment knows. A known app stays known; the others are asked
        about on every batch that holds them: an app configured a moment ago must not have
        its first records skipped (a skipped record is never seen again)."""
        ask = {app_id for app_id in app_ids if app_id and app_id not in self._known}
        if ask:
            async with self._ctx.pool.acquire() as conn:
                self._known |= await app_settings.known_apps(conn, sorted(ask))
        return app_ids & self._known

    async def handle(self, records: Sequence[Record[SendRequest]]) -> None:
        """Process one polled batch. Raising leaves the batch uncommitted (it is redelivered,
        and the ledger makes the redelivery harmless)."""
        now = self._clock()
        # The topic is shared with other deployments: drop their records before reading them.
        known = await self._known_apps({record.value.app_id for record in records})
        mine: dict[tuple[str, uuid.UUID], Job] = {}
        for record in records:
            if record.value.app_id not in known:
                continue
            job = Job.read(record.value, now)
            if job is None:
                continue
            # A message twice in one batch (a redelivered batch can hold a dispatch and its
            # retry): only the latest dispatch can match the row; an older one must not hide it.
            key = (job.app_id, job.message_id)
            seen = mine.get(key)
            if seen is None or job.dispatch > seen.dispatch:
                mine[key] = job
        if not mine:
            return
        pool = self._ctx.pool
        async with pool.acquire() as conn:
            rows = await messages_store.load_rows(conn, list(mine))
            broadcast_ids = {j.broadcast_id for j in mine.values() if j.broadcast_id}
            broadcasts = await load_broadcast_specs(conn, broadcast_ids)
        active: dict[str, list[_Item]] = defaultdict(list)
        skipped = 0
        for key, job in mine.items():
            row = rows.get(key)
            # A first dispatch without a row (broadcast and journey records) gets its row when
            # decided: created in its outcome's state, or "sending" as the claim itself.
            if (
                job.dispatch != 0
                if row is None
                else (
                    row.idempotency_key != job.idempotency_key
                    or row.state != "queued"
                    or row.dispatch != job.dispatch
                )
            ):
                skipped += 1
                continue
            spec = spec_of(job.request)
            cancelled = False
            if job.broadcast_id is not None:
                found = broadcasts.get((job.app_id, job.broadcast_id))
                if found is not None:
                    cancelled = found.cancelled
                    if spec is None:
                        spec = with_record_data(found.spec, job.request)
            item = _Item(job=job, spec=spec, new=row is None)
            if cancelled:
                item.decision = _Fail("BROADCAST_CANCELLED", "the broadcast was cancelled")
            elif spec is None:
                item.decision = _Fail("SPEC_MISSING", "the request names nothing to send")
            active[job.app_id].append(item)
        if skipped:
            self._outcomes.labels("skipped").inc(skipped)
        for app_id, items in active.items():
            await self._handle_app(app_id, items, {k: r.attempts for k, r in rows.items()})

    async def _handle_app(
        self, app_id: str, items: list[_Item], attempts: dict[tuple[str, uuid.UUID], int]
    ) -> None:
        pending = [item for item in items if item.decision is None]
        if pending:
            read_at = time.monotonic()
            users = await self._identity.batch_get_users(app_id, [i.job.ref for i in pending])
            for item, user in zip(pending, users, strict=True):
                item.user = user
                item.read_at = read_at
        pool = self._ctx.pool
        async with pool.acquire() as conn:
            settings = (await app_settings.settings_for(conn, [app_id]))[app_id]
            configs = await load_configs(conn, self._box, [app_id])
            templates = await load_templates(
                conn,
                app_id,
                [
                    (option.template_id, option.template_version)
                    for item in pending
                    if item.spec is not None
                    for option in item.spec.options
                    if option.template_id
                ],
            )
        if settings.quiet_enabled and not settings.default_timezone:
            # Delivery's own setting overrides; else the app's default zone in identity, the
            # one segments and journeys use for users without a zone.
            zone = await self._identity.app_timezone(app_id)
            settings = settings.with_values(default_timezone=zone)
        now = self._clock()
        reach = policy.Reachability(
            configured=frozenset(channel for (_, channel) in configs),
            disabled=frozenset(c for (_, c), config in configs.items() if config.disabled),
            available=frozenset(self._adapters.by_channel),
        )
        for item in pending:
            item.decision = self._decide(item, settings, reach, templates, now)
        await self._apply_caps(app_id, pending, settings, now)
        contexts: dict[int, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {}
        for item in pending:
            if isinstance(item.decision, _Send):
                item.decision = self._render(item, item.decision, contexts)
        await self._record_outcomes(items, now)
        by_channel: dict[Channel, list[_Item]] = defaultdict(list)
        for item in items:
            if isinstance(item.decision, _Send):
                by_channel[item.decision.target.channel].append(item)
        for channel, sends in by_channel.items():
            await self._send_channel(app_id, channel, sends, configs, attempts)

    # --- deciding --------------------------------------------------------------------------

    def _decide(
        self,
        item: _Item,
        settings: app_settings.AppSettings,
        reach: policy.Reachability,
        templates: dict[tuple[str, int], template_pb2.Template],
        now: datetime,
    ) -> _Decision:
        job, spec, user = item.job, item.spec, item.user
        assert spec is not None
        if job.expire_at is not None and now >= job.expire_at:
            return _Fail("EXPIRED", f"its time to live ended at {job.expire_at.isoformat()}")
        if user is None:
            return _Fail("USER_NOT_FOUND", "identity has no such user (erased or never created)")
        option_channels: list[str] = []
        option_templates: list[template_pb2.Template | None] = []
        for option in spec.options:
            template = None
            if option.template_id:
                template = templates.get((option.template_id, option.template_version))
                if template is None:
                    return _Fail("TEMPLATE_NOT_FOUND", f"template {option.template_id} not found")
            name = channels.channel_name(option.channel) if option.channel else None
            if name is None and template is not None:
                name = channels.channel_name(template.channel)
            option_channels.append(name or "")
            option_templates.append(template)
        target = policy.choose_target(user, option_channels, reach)
        if isinstance(target, str):
            return _Fail(target, "no send option can reach the user", option_channels[0])
        option = spec.options[target.option_index]
        template = option_templates[target.option_index]
        if template is not None:
            template_channel = channels.channel_name(template.channel) or ""
            if channels.content_kind_for(template_channel) != channels.content_kind_for(
                target.channel.value
            ):
                return _Fail(
                    "TEMPLATE_CHANNEL_MISMATCH",
                    f"a {template_channel} template cannot go on {target.channel.value}",
                    target.channel.value,
                )
            content, _ = choose_content(template, spec.locale or user.language)
        else:
            content = option.content
        if settings.quiet_enabled and not spec.bypass_quiet_hours:
            zone = policy.user_zone(user, settings.default_timezone)
            rule = policy.QuietRule(settings.quiet_start, settings.quiet_end)
            end = policy.quiet_hours_end(now, rule, zone)
            if end is not None:
                return _Defer(
                    end,
                    "QUIET_HOURS",
                    f"quiet hours in {zone.key} end at {end.isoformat()}",
                    target.channel.value,
                )
        return _Send(
            target=target,
            template_id=template.template_id if template is not None else "",
            template_version=template.version if template is not None else 0,
            content=content,
            counts_for_cap=not spec.bypass_frequency_cap,
        )

    def _cap_rule(
        self, spec: message_pb2.MessageSpec, settings: app_settings.AppSettings
    ) -> policy.CapRule | None:
        if spec.bypass_frequency_cap:
            return None
        if spec.HasField("frequency_cap"):
            cap = spec.frequency_cap
            return policy.CapRule(
                cap.max_messages,
                timedelta(seconds=cap.window.seconds),
                cap.action == message_pb2.FrequencyCap.ACTION_DEFER,
            )
        if settings.cap_max <= 0:
            return None
        return policy.CapRule(
            settings.cap_max,
            timedelta(seconds=settings.cap_window_seconds),
            settings.cap_action == "defer",
        )

    async def _apply_caps(
        self,
        app_id: str,
        items: list[_Item],
        settings: app_settings.AppSettings,
        now: datetime,
    ) -> None:
        capped: list[tuple[_Item, _Send, policy.CapRule]] = []
        for item in items:
            decision = item.decision
            if isinstance(decision, _Send) and item.spec is not None:
                rule = self._cap_rule(item.spec, settings)
                if rule is not None and rule.max_messages > 0:
                    capped.append((item, decision, rule))
        if not capped:
            return
        longest = max(rule.window for _, _, rule in capped)
        pairs = sorted(
            {(item.user.user_id, d.target.channel.value) for item, d, _ in capped if item.user}
        )
        async with self._ctx.pool.acquire() as conn:
            recent = await messages_store.recent_sends(conn, app_id, pairs, now - longest)
        for item, decision, rule in capped:
            assert item.user is not None
            pair = (item.user.user_id, decision.target.channel.value)
            over, fits_at = policy.cap_verdict(now, rule, recent.get(pair, []))
            if not over:
                recent.setdefault(pair, []).append(now)  # counts for the rest of the batch
                continue
            detail = f"at most {rule.max_messages} per {rule.window} on {pair[1]}"
            if rule.defer and fits_at is not None:
                item.decision = _Defer(fits_at, "FREQUENCY_CAPPED", detail, pair[1])
            else:
                item.decision = _Fail("FREQUENCY_CAPPED", detail, pair[1])

    def _render(
        self,
        item: _Item,
        decision: _Send,
        contexts: dict[int, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]],
    ) -> _Decision:
        job, spec, user = item.job, item.spec, item.user
        assert spec is not None
        assert user is not None
        # A broadcast's messages share one spec: convert its Structs once per batch.
        converted = contexts.get(id(spec))
        if converted is None:
            converted = contexts[id(spec)] = (
                struct_variables(spec.data),
                struct_variables(spec.event_properties),
                struct_variables(spec.journey),
            )
        context = RenderContext(
            data=converted[0],
            event=converted[1],
            journey=converted[2],
            message={
                "message_id": str(job.message_id),
                "channel": decision.target.channel.value,
                "broadcast_id": str(job.broadcast_id or ""),
                "requested_at_ms": int(job.requested_at.timestamp() * 1000),
            },
        )
        try:
            rendered = render_content(decision.content, context.variables(user))
        except RenderError as exc:
            return _Fail("RENDER_FAILED", str(exc), decision.target.channel.value)
        if rendered.WhichOneof("kind") == "email" and rendered.email.html:
            rendered.email.html = rewrite_html(
                rendered.email.html, self._links, job.app_id, job.message_id
            )
        decision.content = rendered
        return decision

    # --- recording -------------------------------------------------------------------------

    def _fact(self, job: Job, status: int, now: datetime, **fields: Any) -> Fact:
        request = job.request
        return Fact(
            app_id=job.app_id,
            message_id=job.message_id,
            user_id=fields.pop("user_id", "") or request.user_id,
            status=status,
            time=now,
            idempotency_key=job.idempotency_key,
            broadcast_id=str(job.broadcast_id or ""),
            journey_id=request.journey_id,
            journey_node_id=request.journey_node_id,
            **fields,
        )

    def _parked_request(self, job: Job, user_id: str) -> bytes:
        request = SendRequest()
        request.CopyFrom(job.request)
        if user_id:
            request.user_id = user_id
            request.ClearField("user")
        if not request.HasField("occurred_at"):
            request.occurred_at.FromDatetime(job.requested_at)
        return request.SerializeToString()

    def _new_row(self, item: _Item, decision: _Fail | _Defer, user_id: str) -> NewMessage:
        """The row of a first dispatch decided without a provider call (failed or deferred)."""
        job = item.job
        deferred = isinstance(decision, _Defer)
        return NewMessage(
            app_id=job.app_id,
            message_id=job.message_id,
            idempotency_key=job.idempotency_key,
            user_id=user_id or job.request.user_id,
            broadcast_id=job.broadcast_id,
            state="deferred" if deferred else "failed",
            status=_STATUS_DEFERRED if deferred else _STATUS_FAILED,
            expire_at=job.expire_at,
            due_at=decision.due_at if isinstance(decision, _Defer) else None,
            request=self._parked_request(job, user_id) if deferred else None,
            journey_id=job.request.journey_id,
            journey_node_id=job.request.journey_node_id,
            channel=decision.channel,
        )

    async def _record_outcomes(self, items: list[_Item], now: datetime) -> None:
        finishes: list[Finish] = []
        parks: list[Park] = []
        created: list[NewMessage] = []
        facts: dict[uuid.UUID, Fact] = {}
        deltas = BroadcastDeltas()
        for item in items:
            job, decision = item.job, item.decision
            user_id = item.user.user_id if item.user is not None else ""
            if item.new and isinstance(decision, _Fail | _Defer):
                created.append(self._new_row(item, decision, user_id))
            if isinstance(decision, _Fail):
                finishes.append(
                    Finish(
                        job.app_id,
                        job.message_id,
                        "queued",
                        job.dispatch,
                        "failed",
                        _STATUS_FAILED,
                        user_id,
                        decision.channel,
                    )
                )
                facts[job.message_id] = self._fact(
                    job,
                    _STATUS_FAILED,
                    now,
                    user_id=user_id,
                    reason=decision.reason,
                    detail=decision.detail,
                    channel=decision.channel,
                    nth=str(job.dispatch),
                )
                deltas.add(job, failed=1)
            elif isinstance(decision, _Defer):
                parks.append(
                    Park(
                        job.app_id,
                        job.message_id,
                        "queued",
                        job.dispatch,
                        "deferred",
                        decision.due_at,
                        self._parked_request(job, user_id),
                        user_id,
                        decision.channel,
                    )
                )
                facts[job.message_id] = self._fact(
                    job,
                    _STATUS_DEFERRED,
                    now,
                    user_id=user_id,
                    reason=decision.reason,
                    detail=decision.detail,
                    channel=decision.channel,
                    nth=str(job.dispatch),
                )
                deltas.add(job, deferred=1)
        if not finishes and not parks:
            return
        fresh = {row.message_id for row in created}
        async with self._ctx.pool.acquire() as conn, conn.transaction():
            changed = await messages_store.insert_missing(conn, created, now)
            changed |= await messages_store.finish(
                conn, [f for f in finishes if f.message_id not in fresh], now
            )
            changed |= await messages_store.park(
                conn, [p for p in parks if p.message_id not in fresh], now
            )
            await record_facts(conn, [fact for mid, fact in facts.items() if mid in changed])
            await apply_deltas(conn, deltas.only(changed))
        failed = sum(1 for f in finishes if f.message_id in changed)
        self._outcomes.labels("failed").inc(failed)
        self._outcomes.labels("deferred").inc(len(changed) - failed)

    # --- sending ---------------------------------------------------------------------------

    def _window(
        self, app_id: str, channel: Channel, configs: dict[tuple[str, Channel], ChannelConfig]
    ) -> int:
        """How many calls of ``channel`` can really be in flight at once: the concurrency, no
        more than the adapter's connections, nor _CHUNK_SECONDS of a rate-limited channel's."""
        window = max(1, self._settings.send_concurrency)
        pool = getattr(self._adapters.get(channel), "max_in_flight", None)
        if isinstance(pool, int) and pool > 0:
            window = min(window, pool)
        config = configs.get((app_id, channel))
        rate = self._limits.rate(channel, config.rate_limit if config else 0.0)
        if rate > 0:
            window = min(window, max(1, int(rate * _CHUNK_SECONDS)))
        return window

    async def _send_channel(
        self,
        app_id: str,
        channel: Channel,
        sends: list[_Item],
        configs: dict[tuple[str, Channel], ChannelConfig],
        attempts: dict[tuple[str, uuid.UUID], int],
    ) -> None:
        """Call the provider for ``sends``, at most a window of calls at a time.

        A row is claimed (committed ``sending``) only when a slot is free for its call, and the
        call starts right after: a claimed row means a call in flight, so what a crash leaves
        undecided is the calls really under way, not a queue of calls waiting for a connection.
        Claims go in groups of a quarter window (one statement each), and answers are recorded
        in groups of the same size (or all at once when no call is left in flight), one
        transaction at a time; new claims wait while a window of answers is unrecorded.
        """
        window = self._window(app_id, channel, configs)
        group = max(1, window // 4)
        config = configs.get((app_id, channel))
        # Rate limits are waited out before the claim: a claimed call never waits for a token.
        bucket = (
            self._limits.bucket(app_id, channel, config.rate_limit)
            if config is not None and channel is not Channel.IN_APP
            else None
        )
        # Claims of a rate-limited channel go _RATE_GROUP_SECONDS of calls at a time.
        most = window
        if bucket is not None and bucket.rate > 0:
            most = max(1, int(bucket.rate * _RATE_GROUP_SECONDS))
        waiting = deque(sends)
        calls: dict[asyncio.Task[ProviderResult], _Item] = {}
        answered: list[tuple[_Item, ProviderResult]] = []
        recorder: asyncio.Task[None] | None = None
        recorders: list[asyncio.Task[None]] = []
        # Completions are collected by callbacks (asyncio.wait over a whole window per answer
        # would cost O(window) per message).
        finished: list[asyncio.Task[ProviderResult]] = []
        wake = asyncio.Event()

        def call_done(task: asyncio.Task[ProviderResult]) -> None:
            finished.append(task)
            wake.set()

        def recorder_done(_: asyncio.Task[None]) -> None:
            wake.set()

        try:
            while waiting or calls:
                while finished:
                    done = finished.pop()
                    answered.append((calls.pop(done), done.result()))
                # One transaction per group of answers (or for the last ones): every record
                # transaction commits receipts to the outbox, and those commits serialise.
                if (
                    answered
                    and (not calls or len(answered) >= group)
                    and (recorder is None or recorder.done())
                ):
                    recorder = asyncio.create_task(self._record_results(answered, attempts))
                    recorder.add_done_callback(recorder_done)
                    recorders.append(recorder)
                    answered = []
                free = window - len(calls)
                # New claims wait while a window of answers is not yet recorded: what a crash
                # leaves undecided stays bounded when recording is slower than the provider.
                if waiting and free >= min(group, len(waiting)) and len(answered) < window:
                    part = [waiting.popleft() for _ in range(min(free, most, len(waiting)))]
                    waited = False
                    if bucket is not None:
                        for _ in part:
                            waited = await bucket.take() > 0 or waited
                    # Profiles read before a wait are read again: a late opt-out wins.
                    part = await self._recheck(app_id, part, waited)
                    claimed = await self._claim(app_id, part) if part else []
                    for item in claimed:
                        call = asyncio.create_task(self._call_provider(item, configs))
                        call.add_done_callback(call_done)
                        calls[call] = item
                    continue
                if not finished:
                    wake.clear()
                    await wake.wait()
        finally:
            # Calls that were made must have their outcome recorded, whatever stopped us.
            if calls:
                results = await asyncio.gather(*calls, return_exceptions=True)
                for item, result in zip(calls.values(), results, strict=True):
                    if isinstance(result, ProviderResult):
                        answered.append((item, result))
            if answered:
                recorders.append(asyncio.create_task(self._record_results(answered, attempts)))
            outcomes = await asyncio.gather(*recorders, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _recheck(self, app_id: str, part: list[_Item], waited: bool) -> list[_Item]:
        """Read the profiles of ``part`` again if it ``waited`` for rate-limit tokens or its
        reads are older than ``_PROFILE_MAX_AGE`` (one BatchGetUsers), and re-check each
        target; those no longer reachable are recorded FAILED with the policy's reason.
        Returns the items still to send."""
        now = time.monotonic()
        stale = [item for item in part if waited or now - item.read_at > _PROFILE_MAX_AGE]
        if not stale:
            return part
        refs: list[user_ref_pb2.UserRef] = []
        for item in stale:
            assert item.user is not None
            refs.append(user_ref_pb2.UserRef(user_id=item.user.user_id))
        users = await self._identity.batch_get_users(app_id, refs)
        refused: list[_Item] = []
        for item, user in zip(stale, users, strict=True):
            decision = item.decision
            assert isinstance(decision, _Send)
            item.read_at = now
            target = policy.recheck_target(user, decision.target)
            if isinstance(target, policy.Target):
                decision.target = target
                continue
            detail = "the profile, read again right before the call, refuses it"
            item.decision = _Fail(target, detail, decision.target.channel.value)
            refused.append(item)
        if refused:
            await self._record_outcomes(refused, self._clock())
        return [item for item in part if isinstance(item.decision, _Send)]

    async def _claim(self, app_id: str, items: list[_Item]) -> list[_Item]:
        """Claim the ledger rows of ``items`` (committed); returns the items claimed."""
        now = self._clock()
        claims: list[Claim] = []
        created: list[NewMessage] = []
        for item in items:
            decision = item.decision
            assert isinstance(decision, _Send)
            assert item.user is not None
            job = item.job
            channel = decision.target.channel
            subscription = decision.target.subscription
            # What the scheduler publishes again if this call's outcome is lost (resend-safe
            # channels only: elsewhere such a call is never repeated).
            request = (
                self._parked_request(job, item.user.user_id) if channel in RESEND_SAFE else None
            )
            claim = Claim(
                app_id=app_id,
                message_id=job.message_id,
                dispatch=job.dispatch,
                user_id=item.user.user_id,
                channel=channel.value,
                subscription_id=subscription.subscription_id if subscription else "",
                template_id=decision.template_id,
                template_version=decision.template_version,
                counts_for_cap=decision.counts_for_cap,
                content=decision.content.in_app.SerializeToString()
                if channel is Channel.IN_APP
                else None,
                request=request,
            )
            if not item.new:
                claims.append(claim)
                continue
            created.append(
                NewMessage(
                    app_id=app_id,
                    message_id=job.message_id,
                    idempotency_key=job.idempotency_key,
                    user_id=claim.user_id,
                    broadcast_id=job.broadcast_id,
                    state="sending",
                    status=_STATUS_QUEUED,
                    expire_at=job.expire_at,
                    request=request,
                    journey_id=job.request.journey_id,
                    journey_node_id=job.request.journey_node_id,
                    attempts=1,
                    channel=claim.channel,
                    subscription_id=claim.subscription_id,
                    template_id=claim.template_id,
                    template_version=claim.template_version,
                    sent_at=now if claim.counts_for_cap else None,
                    content=claim.content,
                )
            )
        # The ledger rows, committed before any provider call. A row created here is the
        # claim: a concurrent worker's insert of the same message or key creates nothing.
        lease = await self._lease.key()
        async with self._ctx.pool.acquire() as conn:
            claimed = await messages_store.claim(conn, claims, now, lease)
            claimed |= await messages_store.insert_missing(conn, created, now, lease)
        return [item for item in items if item.job.message_id in claimed]

    async def _call_provider(
        self, item: _Item, configs: dict[tuple[str, Channel], ChannelConfig]
    ) -> ProviderResult:
        decision = item.decision
        assert isinstance(decision, _Send)
        job, channel = item.job, decision.target.channel
        if channel is Channel.IN_APP:
            # Its content was stored with the claim; the SDK fetches it from there.
            return ProviderResult(Outcome.SENT, detail="in_app:ready to fetch")
        adapter = self._adapters.get(channel)
        config = configs.get((job.app_id, channel))
        if adapter is None or config is None:
            return ProviderResult(Outcome.FAILED, detail=f"{channel.value}:not available")
        subscription = decision.target.subscription
        recipient = Recipient()
        if subscription is not None:
            recipient = Recipient(
                address=subscription.token,
                web_push_p256dh=subscription.web_push_keys.p256dh,
                web_push_auth=subscription.web_push_keys.auth,
            )
        content = to_outbound_content(
            decision.content,
            unsubscribe_url=self._links.unsubscribe_url(job.app_id, job.message_id)
            if channel is Channel.EMAIL
            else "",
        )
        ttl = None
        if job.expire_at is not None:
            ttl = max(1, int((job.expire_at - self._clock()).total_seconds()))
        message = OutboundMessage(
            message_id=str(job.message_id),
            idempotency_key=job.idempotency_key,
            channel=channel,
            recipient=recipient,
            content=content,
            ttl_seconds=ttl,
            status_callback_url=self._links.status_callback_url(
                job.app_id, job.message_id, "twilio"
            )
            if channel is Channel.SMS
            else "",
        )
        started = time.perf_counter()
        try:
            result = await adapter.send(message, config.credentials)
        except Exception as exc:  # adapters should not raise; if one does, retry later
            log.exception("the %s adapter raised", adapter.name)
            result = ProviderResult(
                Outcome.RETRY, detail=f"{adapter.name}:adapter error {type(exc).__name__}"
            )
        self._call_seconds.labels(channel.value).observe(time.perf_counter() - started)
        return result

    async def _record_results(
        self,
        answered: Sequence[tuple[_Item, ProviderResult]],
        attempts: dict[tuple[str, uuid.UUID], int],
    ) -> None:
        now = self._clock()
        settings = self._settings
        finishes: list[Finish] = []
        parks: list[Park] = []
        facts: dict[uuid.UUID, Fact] = {}
        dead: list[tuple[uuid.UUID, str, DeadLetter]] = []
        deltas = BroadcastDeltas()
        for item, result in answered:
            job, decision, user = item.job, item.decision, item.user
            assert isinstance(decision, _Send)
            assert user is not None
            channel = decision.target.channel.value
            subscription = decision.target.subscription
            common: dict[str, Any] = {
                "user_id": user.user_id,
                "channel": channel,
                "subscription_id": subscription.subscription_id if subscription else "",
                "detail": result.detail,
            }
            attempt = attempts.get((job.app_id, job.message_id), 0) + 1
            # The provider may have taken the call and would deliver a repeat: at most once.
            unknown = (
                result.outcome is Outcome.RETRY
                and result.maybe_delivered
                and decision.target.channel not in RESEND_SAFE
            )
            if result.outcome is Outcome.SENT:
                finishes.append(
                    Finish(
                        job.app_id,
                        job.message_id,
                        "sending",
                        job.dispatch,
                        "sent",
                        _STATUS_SENT,
                        user.user_id,
                        channel,
                        result.provider_message_id,
                    )
                )
                facts[job.message_id] = self._fact(job, _STATUS_SENT, now, **common)
                deltas.add(job, sent=1)
            elif (
                result.outcome is Outcome.RETRY and not unknown and attempt < settings.max_attempts
            ):
                delay = policy.backoff_seconds(
                    attempt,
                    base=settings.retry_base_seconds,
                    maximum=settings.retry_max_seconds,
                    retry_after=result.retry_after,
                )
                due = now + timedelta(seconds=delay)
                parks.append(
                    Park(
                        job.app_id,
                        job.message_id,
                        "sending",
                        job.dispatch,
                        "retry_wait",
                        due,
                        self._parked_request(job, user.user_id),
                        user.user_id,
                        channel,
                    )
                )
                # A lost answer on a resend-safe channel is repeated with the same key too;
                # its timeline says so (the receiver may see the key twice, and drop one).
                facts[job.message_id] = self._fact(
                    job,
                    _STATUS_DEFERRED,
                    now,
                    reason="OUTCOME_UNKNOWN" if result.maybe_delivered else "PROVIDER_RETRY",
                    nth=f"r{attempt}",
                    **common,
                )
                deltas.add(job, deferred=1)
            else:
                exhausted = result.outcome is Outcome.RETRY and not unknown
                if unknown:
                    reason = "OUTCOME_UNKNOWN"
                else:
                    reason = "RETRIES_EXHAUSTED" if exhausted else "PROVIDER_REJECTED"
                finishes.append(
                    Finish(
                        job.app_id,
                        job.message_id,
                        "sending",
                        job.dispatch,
                        "failed",
                        _STATUS_FAILED,
                        user.user_id,
                        channel,
                    )
                )
                facts[job.message_id] = self._fact(
                    job,
                    _STATUS_FAILED,
                    now,
                    reason=reason,
                    token_invalid=result.token_invalid,
                    nth=f"f{attempt}",
                    **common,
                )
                deltas.add(job, failed=1)
                if exhausted:
                    letter = DeadLetter(
                        event_id=str(uuid.uuid5(job.message_id, f"dead:{attempt}")),
                        source_topic="delivery.requests",
                        key=record_key(job.request).encode(),
                        value=job.request.SerializeToString(),
                        service="delivery",
                        reason=f"{reason} after {attempt} attempts: {result.detail}",
                    )
                    letter.occurred_at.FromDatetime(now)
                    dead.append((job.message_id, user.user_id, letter))
        try:
            changed = await self._commit_results(now, finishes, parks, facts, deltas, dead)
        except Exception:
            # The answers are lost; the rows must not stay "sending" under a live lease (the
            # scheduler settles only a dead worker's rows): give them up to the scheduler.
            log.exception(
                "recording %d provider answers failed; releasing the lease", len(answered)
            )
            await self._lease.release()
            raise
        for finish in finishes:
            if finish.message_id in changed:
                self._outcomes.labels("sent" if finish.state == "sent" else "failed").inc()
        self._outcomes.labels("retry").inc(sum(1 for p in parks if p.message_id in changed))

    async def _commit_results(
        self,
        now: datetime,
        finishes: list[Finish],
        parks: list[Park],
        facts: dict[uuid.UUID, Fact],
        deltas: BroadcastDeltas,
        dead: list[tuple[uuid.UUID, str, DeadLetter]],
    ) -> set[uuid.UUID]:
        """Record the answers in one transaction, retried with a bounded backoff; returns the
        ids of the messages it moved.

        Repeating it is harmless: every write is conditional on the row still being the
        claimed ``sending`` dispatch, and receipts, counts and dead letters go only with the
        rows that moved, so a retry after a commit whose answer was lost writes nothing.
        """
        delay = _RECORD_BACKOFF
        for attempt in range(1, _RECORD_ATTEMPTS + 1):
            try:
                async with self._ctx.pool.acquire() as conn, conn.transaction():
                    changed = await messages_store.finish(conn, finishes, now)
                    changed |= await messages_store.park(conn, parks, now)
                    await record_facts(
                        conn, [fact for mid, fact in facts.items() if mid in changed]
                    )
                    await apply_deltas(conn, deltas.only(changed))
                    await outbox.enqueue_many(
                        conn, DEAD_LETTERS, [(key, dl) for mid, key, dl in dead if mid in changed]
                    )
                return changed
            except Exception as exc:
                if attempt == _RECORD_ATTEMPTS:
                    raise
                log.warning(
                    "recording provider answers failed (attempt %d of %d), again in %.1fs: %r",
                    attempt,
                    _RECORD_ATTEMPTS,
                    delay,
                    exc,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECORD_BACKOFF_MAX)
        raise AssertionError("unreachable")
