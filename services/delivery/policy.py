"""Send-time policy, pure: which subscription, quiet hours, frequency caps, TTL, retry backoff.

The worker gathers the facts (the profile from identity, the app's settings and channels, how
many messages the user got lately) and these functions decide; nothing here does I/O, so every
rule is unit-tested with fixed clocks.

Rules, in the order they apply (the first that refuses wins):

1. **TTL**: past ``expire_time`` -> FAILED, ``EXPIRED``.
2. **Erased user**: identity has no profile -> FAILED, ``USER_NOT_FOUND`` (an erased user is
   never messaged, even by a job already in flight).
3. **Reachability** ("best channel"): the first send option the user can be reached on: a
   subscription of that channel that is enabled and opted in (the most recently active one),
   and a configured, enabled channel whose adapter exists. Webhooks need no subscription; an
   in-app message goes to the user's most recently active enabled device (iOS, Android, web),
   opted in or not, and needs no channel. None reachable -> FAILED with the first option's
   reason (``NO_SUBSCRIPTION``, ``NOT_OPTED_IN``, ``SUBSCRIPTION_DISABLED``,
   ``CHANNEL_NOT_CONFIGURED``, ``CHANNEL_DISABLED``, ``CHANNEL_UNAVAILABLE``). Subscription
   state is read from identity per batch and read again (:func:`recheck_target`) before a
   claim whose profiles are older than a second (a rate-limited channel's later calls), so an
   unsubscribe or erasure committed before the call wins.
4. **Quiet hours** (unless bypassed): inside the window in the user's time zone (else the app's
   default zone, else UTC) -> DEFERRED to the window's end, ``QUIET_HOURS``.
5. **Frequency cap** (unless bypassed; the send's cap overrides the app's): the user already got
   ``max_messages`` on that channel within the rolling ``window`` -> DROP: FAILED
   ``FREQUENCY_CAPPED``; DEFER: DEFERRED until the oldest of those leaves the window.
"""

from __future__ import annotations

import random
import zoneinfo
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta

from tidings.identity.v1 import subscription_pb2, user_pb2

from services.delivery import channels
from services.delivery.providers.base import Channel

__all__ = [
    "CapRule",
    "QuietRule",
    "Reachability",
    "Target",
    "backoff_seconds",
    "cap_verdict",
    "choose_target",
    "quiet_hours_end",
    "recheck_target",
    "user_zone",
]

_SUBSCRIBED = (subscription_pb2.OPT_IN_STATE_SUBSCRIBED, subscription_pb2.OPT_IN_STATE_UNSPECIFIED)


@dataclass(frozen=True, slots=True)
class Target:
    """Where one message goes: a concrete channel and, except for webhooks, a subscription."""

    option_index: int
    channel: Channel
    subscription: subscription_pb2.Subscription | None


@dataclass(frozen=True, slots=True)
class Reachability:
    """What the worker knows about the app's channels: configured, enabled, with an adapter."""

    configured: frozenset[Channel]
    disabled: frozenset[Channel]
    available: frozenset[Channel]

    def problem(self, channel: Channel) -> str | None:
        """Why the app cannot send on ``channel`` now, or None."""
        if channel not in self.available:
            return "CHANNEL_UNAVAILABLE"
        if channel not in self.configured:
            return "CHANNEL_NOT_CONFIGURED"
        if channel in self.disabled:
            return "CHANNEL_DISABLED"
        return None


def _subscription_problem(
    user: user_pb2.User, wanted: Sequence[Channel]
) -> tuple[subscription_pb2.Subscription | None, str]:
    candidates = [
        s for s in user.subscriptions if channels.SUBSCRIPTION_CHANNEL.get(s.type) in wanted
    ]
    if not candidates:
        return None, "NO_SUBSCRIPTION"
    enabled = [s for s in candidates if s.enabled]
    if not enabled:
        return None, "SUBSCRIPTION_DISABLED"
    opted_in = [s for s in enabled if s.opt_in in _SUBSCRIBED]
    if not opted_in:
        return None, "NOT_OPTED_IN"
    best = max(opted_in, key=lambda s: (s.last_active_time.ToNanoseconds(), s.subscription_id))
    return best, ""


#: The subscription types of devices running the app's SDK (iOS, Android, web).
_DEVICE_TYPES = frozenset({1, 2, 3})


def _device_subscription(
    user: user_pb2.User,
) -> tuple[subscription_pb2.Subscription | None, str]:
    """Where an in-app message goes: the most recently active enabled device of the user.
    Push permission (opt-in) is not needed to show a message inside the app."""
    devices = [s for s in user.subscriptions if s.type in _DEVICE_TYPES]
    enabled = [s for s in devices if s.enabled]
    if not enabled:
        return None, "SUBSCRIPTION_DISABLED" if devices else "NO_SUBSCRIPTION"
    best = max(enabled, key=lambda s: (s.last_active_time.ToNanoseconds(), s.subscription_id))
    return best, ""


def choose_target(
    user: user_pb2.User, option_channels: Sequence[str], reach: Reachability
) -> Target | str:
    """The first option the user can be reached on, or the first option's reason why not.

    Args:
        user: The profile, with subscriptions, as identity answered just now.
        option_channels: The channel name of each send option, in preference order.
        reach: The app's channels.
    """
    first_problem = ""
    for index, name in enumerate(option_channels):
        if name == channels.IN_APP:
            subscription, problem = _device_subscription(user)
            if subscription is not None:
                return Target(index, Channel.IN_APP, subscription)
        elif name == Channel.WEBHOOK.value:
            problem = reach.problem(Channel.WEBHOOK) or ""
            if not problem:
                return Target(index, Channel.WEBHOOK, None)
        else:
            usable = [c for c in channels.deliverable_channels(name) if reach.problem(c) is None]
            if not usable:
                concrete = channels.deliverable_channels(name)
                problem = reach.problem(concrete[0]) or "CHANNEL_NOT_CONFIGURED"
            else:
                subscription, problem = _subscription_problem(user, usable)
                if subscription is not None:
                    channel = channels.SUBSCRIPTION_CHANNEL[subscription.type]
                    return Target(index, channel, subscription)
        first_problem = first_problem or problem
    return first_problem or "NO_SUBSCRIPTION"


def recheck_target(user: user_pb2.User | None, target: Target) -> Target | str:
    """``target`` against a profile read again just before the call: the target with the
    subscription as it is now, or why it can no longer be used.

    The channel stays the one chosen (its content is rendered for it); within it the usual
    rule picks the subscription again, so an opted-out chat fails ``NOT_OPTED_IN`` unless the
    user has another usable one on that channel.

    Args:
        user: The profile identity answered now (None: erased or gone -> ``USER_NOT_FOUND``).
        target: What :func:`choose_target` chose from the earlier read.
    """
    if user is None:
        return "USER_NOT_FOUND"
    if target.subscription is None:  # webhooks need none
        return target
    if target.channel is Channel.IN_APP:
        subscription, problem = _device_subscription(user)
    else:
        subscription, problem = _subscription_problem(user, [target.channel])
    if subscription is None:
        return problem
    return Target(target.option_index, target.channel, subscription)


def user_zone(user: user_pb2.User, default_timezone: str) -> zoneinfo.ZoneInfo:
    """The user's time zone, else the app's default, else UTC (unknown names fall through)."""
    for name in (user.timezone, default_timezone, "UTC"):
        if name:
            try:
                return zoneinfo.ZoneInfo(name)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
                continue
    return zoneinfo.ZoneInfo("UTC")


@dataclass(frozen=True, slots=True)
class QuietRule:
    """Quiet hours: local start and end, minutes after midnight (end < start spans midnight)."""

    start_minute: int
    end_minute: int


def _local(day: datetime, minute: int, zone: zoneinfo.ZoneInfo) -> datetime:
    # A wall time that does not exist (a DST gap) is read with fold=0, which zoneinfo maps to
    # the instant the offset before the gap gives: moved forward by the gap (02:30 in a
    # 02:00->03:00 gap is 03:30 after it).
    naive = datetime.combine(day.date(), time(minute // 60, minute % 60))
    return naive.replace(tzinfo=zone)


def quiet_hours_end(now: datetime, rule: QuietRule, zone: zoneinfo.ZoneInfo) -> datetime | None:
    """When the quiet period containing ``now`` ends (UTC-aware), or None outside quiet hours.

    A window spanning midnight (22:00-08:00) that started yesterday ends today; an empty window
    (start == end) is never quiet.
    """
    if rule.start_minute == rule.end_minute:
        return None
    local = now.astimezone(zone)
    minute = local.hour * 60 + local.minute
    start, end = rule.start_minute, rule.end_minute
    if start < end:
        inside = start <= minute < end
        end_day = local
    else:
        inside = minute >= start or minute < end
        end_day = local + timedelta(days=1) if minute >= start else local
    if not inside:
        return None
    result = _local(end_day, end, zone)
    # Normalise through UTC so a gap-shifted wall time is a real instant.
    return result.astimezone(zoneinfo.ZoneInfo("UTC"))


@dataclass(frozen=True, slots=True)
class CapRule:
    """At most ``max_messages`` per user and channel within ``window``."""

    max_messages: int
    window: timedelta
    defer: bool


def cap_verdict(
    now: datetime, rule: CapRule, recent: Iterable[datetime]
) -> tuple[bool, datetime | None]:
    """Whether one more message is over the cap, and when it would fit again.

    Args:
        now: The current time.
        rule: The cap.
        recent: When the user's messages on this channel were sent (any order; older ones
            outside the window are ignored).

    Returns:
        ``(False, None)`` when it fits; ``(True, when)`` when it does not, ``when`` being the
        moment enough of them have left the window.
    """
    if rule.max_messages <= 0:
        return False, None
    inside = sorted(t for t in recent if t > now - rule.window)
    if len(inside) < rule.max_messages:
        return False, None
    # After the (len - max + 1)-th oldest leaves the window, one more fits.
    leaving = inside[len(inside) - rule.max_messages]
    return True, leaving + rule.window


def backoff_seconds(
    attempt: int,
    *,
    base: float,
    maximum: float,
    retry_after: float | None,
    rng: random.Random | None = None,
) -> float:
    """Delay before retry number ``attempt`` (1 for the first retry): exponential with full
    jitter, never less than the provider's ``Retry-After``, never more than ``maximum`` (unless
    Retry-After asks for more, which is honoured)."""
    ceiling = min(maximum, base * (2 ** max(0, attempt - 1)))
    delay = (rng or random).uniform(ceiling / 2, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def channel_counts(pairs: Iterable[tuple[str, str]]) -> Mapping[tuple[str, str], int]:
    """How often each (user, channel) pair occurs (in-batch cap accounting)."""
    counts: dict[tuple[str, str], int] = {}
    for pair in pairs:
        counts[pair] = counts.get(pair, 0) + 1
    return counts
