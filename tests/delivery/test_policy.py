"""Send-time policy (pure): reachability, quiet hours in the user's zone, caps, backoff."""

from __future__ import annotations

import random
import zoneinfo
from datetime import UTC, datetime, timedelta

from tidings.identity.v1 import subscription_pb2 as spb
from tidings.identity.v1 import user_pb2

from services.delivery import policy
from services.delivery.providers.base import Channel

ALL = frozenset(Channel)
REACH = policy.Reachability(configured=ALL, disabled=frozenset(), available=ALL)


def _user(*subscriptions: spb.Subscription) -> user_pb2.User:
    return user_pb2.User(user_id="u", subscriptions=subscriptions)


def _sub(
    kind: int, sid: str, *, enabled: bool = True, opted_in: bool = True, active: int = 0
) -> spb.Subscription:
    sub = spb.Subscription(
        subscription_id=sid,
        type=kind,  # type: ignore[arg-type]
        token="t",
        enabled=enabled,
        opt_in=spb.OPT_IN_STATE_SUBSCRIBED if opted_in else spb.OPT_IN_STATE_UNSUBSCRIBED,
    )
    sub.last_active_time.FromSeconds(active)
    return sub


def test_best_channel_takes_the_first_reachable_option() -> None:
    user = _user(_sub(spb.SUBSCRIPTION_TYPE_EMAIL, "e1"), _sub(spb.SUBSCRIPTION_TYPE_SMS, "s1"))
    target = policy.choose_target(user, ["ios_push", "email", "sms"], REACH)
    assert isinstance(target, policy.Target)
    assert (target.option_index, target.channel, target.subscription.subscription_id) == (  # type: ignore[union-attr]
        1,
        Channel.EMAIL,
        "e1",
    )


def test_unsubscribed_and_disabled_subscriptions_are_never_chosen() -> None:
    opted_out = _user(_sub(spb.SUBSCRIPTION_TYPE_EMAIL, "e1", opted_in=False))
    assert policy.choose_target(opted_out, ["email"], REACH) == "NOT_OPTED_IN"
    disabled = _user(_sub(spb.SUBSCRIPTION_TYPE_EMAIL, "e1", enabled=False))
    assert policy.choose_target(disabled, ["email"], REACH) == "SUBSCRIPTION_DISABLED"
    assert policy.choose_target(_user(), ["email"], REACH) == "NO_SUBSCRIPTION"


def test_push_picks_the_most_recently_active_device() -> None:
    user = _user(
        _sub(spb.SUBSCRIPTION_TYPE_IOS_PUSH, "old", active=100),
        _sub(spb.SUBSCRIPTION_TYPE_ANDROID_PUSH, "new", active=200),
        _sub(spb.SUBSCRIPTION_TYPE_WEB_PUSH, "off", active=300, opted_in=False),
    )
    target = policy.choose_target(user, ["push"], REACH)
    assert isinstance(target, policy.Target)
    assert target.channel is Channel.ANDROID_PUSH


def test_unconfigured_channel_is_the_reason() -> None:
    reach = policy.Reachability(
        configured=frozenset({Channel.WEBHOOK}), disabled=frozenset(), available=ALL
    )
    user = _user(_sub(spb.SUBSCRIPTION_TYPE_EMAIL, "e1"))
    assert policy.choose_target(user, ["email"], reach) == "CHANNEL_NOT_CONFIGURED"
    target = policy.choose_target(user, ["email", "webhook"], reach)
    assert isinstance(target, policy.Target)
    assert target.channel is Channel.WEBHOOK


MADRID = zoneinfo.ZoneInfo("Europe/Madrid")
NIGHT = policy.QuietRule(start_minute=22 * 60, end_minute=8 * 60)


def test_quiet_hours_spanning_midnight_end_next_morning_local_time() -> None:
    # 23:30 in Madrid (CET, UTC+1) = 22:30 UTC: quiet until 08:00 local = 07:00 UTC next day.
    now = datetime(2026, 1, 10, 22, 30, tzinfo=UTC)
    assert policy.quiet_hours_end(now, NIGHT, MADRID) == datetime(2026, 1, 11, 7, 0, tzinfo=UTC)
    # 03:00 local: quiet until 08:00 the same day.
    early = datetime(2026, 1, 10, 2, 0, tzinfo=UTC)
    assert policy.quiet_hours_end(early, NIGHT, MADRID) == datetime(2026, 1, 10, 7, 0, tzinfo=UTC)
    # 12:00 local: not quiet.
    assert policy.quiet_hours_end(datetime(2026, 1, 10, 11, 0, tzinfo=UTC), NIGHT, MADRID) is None


def test_quiet_hours_use_the_users_zone_not_utc() -> None:
    now = datetime(2026, 1, 10, 23, 0, tzinfo=UTC)  # 23:00 UTC, 15:00 in Los Angeles
    la = policy.user_zone(user_pb2.User(timezone="America/Los_Angeles"), "Europe/Madrid")
    assert policy.quiet_hours_end(now, NIGHT, la) is None
    madrid = policy.user_zone(user_pb2.User(), "Europe/Madrid")  # app default
    assert policy.quiet_hours_end(now, NIGHT, madrid) is not None


def test_quiet_hours_ending_in_a_dst_gap_end_just_after_it() -> None:
    # 2026-03-29: Madrid jumps from 02:00 to 03:00. A window ending at 02:30 ends at 03:30 CEST
    # (01:30 UTC), a real instant after the gap.
    rule = policy.QuietRule(start_minute=0, end_minute=150)
    now = datetime(2026, 3, 28, 23, 30, tzinfo=UTC)  # 00:30 local
    end = policy.quiet_hours_end(now, rule, MADRID)
    assert end == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)


def test_frequency_cap_counts_a_rolling_window() -> None:
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    rule = policy.CapRule(max_messages=2, window=timedelta(hours=1), defer=True)
    recent = [now - timedelta(minutes=50), now - timedelta(minutes=10), now - timedelta(hours=2)]
    over, fits_at = policy.cap_verdict(now, rule, recent)
    assert over
    assert fits_at == now - timedelta(minutes=50) + timedelta(hours=1)
    assert policy.cap_verdict(now, rule, recent[1:]) == (False, None)


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    rng = random.Random(7)
    delays = [
        policy.backoff_seconds(n, base=1, maximum=60, retry_after=None, rng=rng)
        for n in (1, 2, 3, 4)
    ]
    for n, delay in enumerate(delays, start=1):
        ceiling = min(60, 2 ** (n - 1))
        assert ceiling / 2 <= delay <= ceiling
    assert policy.backoff_seconds(1, base=1, maximum=60, retry_after=30, rng=rng) >= 30
    assert policy.backoff_seconds(20, base=1, maximum=60, retry_after=None, rng=rng) <= 60


def test_in_app_goes_to_the_most_recently_active_enabled_device_opted_in_or_not() -> None:
    user = _user(
        _sub(spb.SUBSCRIPTION_TYPE_IOS_PUSH, "phone", active=100, opted_in=False),
        _sub(spb.SUBSCRIPTION_TYPE_WEB_PUSH, "laptop", active=50),
        _sub(spb.SUBSCRIPTION_TYPE_ANDROID_PUSH, "gone", active=300, enabled=False),
        _sub(spb.SUBSCRIPTION_TYPE_EMAIL, "mail", active=400),
    )
    nothing = policy.Reachability(frozenset(), frozenset(), frozenset())
    target = policy.choose_target(user, ["in_app"], nothing)  # no channel to configure
    assert isinstance(target, policy.Target)
    assert target.channel is Channel.IN_APP
    assert target.subscription is not None
    assert target.subscription.subscription_id == "phone"
    only_email = _user(_sub(spb.SUBSCRIPTION_TYPE_EMAIL, "mail"))
    assert policy.choose_target(only_email, ["in_app"], REACH) == "NO_SUBSCRIPTION"
    disabled = _user(_sub(spb.SUBSCRIPTION_TYPE_IOS_PUSH, "p", enabled=False))
    assert policy.choose_target(disabled, ["in_app"], REACH) == "SUBSCRIPTION_DISABLED"


def test_a_target_read_again_follows_the_subscription_as_it_is_now() -> None:
    chat = _sub(spb.SUBSCRIPTION_TYPE_TELEGRAM, "t1")
    target = policy.Target(0, Channel.TELEGRAM, chat)
    assert policy.recheck_target(None, target) == "USER_NOT_FOUND"
    opted_out = _user(_sub(spb.SUBSCRIPTION_TYPE_TELEGRAM, "t1", opted_in=False))
    assert policy.recheck_target(opted_out, target) == "NOT_OPTED_IN"
    disabled = _user(_sub(spb.SUBSCRIPTION_TYPE_TELEGRAM, "t1", enabled=False))
    assert policy.recheck_target(disabled, target) == "SUBSCRIPTION_DISABLED"
    assert policy.recheck_target(_user(), target) == "NO_SUBSCRIPTION"
    # Another usable chat on the same channel takes over; the channel never changes.
    moved = _user(
        _sub(spb.SUBSCRIPTION_TYPE_TELEGRAM, "t1", opted_in=False),
        _sub(spb.SUBSCRIPTION_TYPE_TELEGRAM, "t2"),
        _sub(spb.SUBSCRIPTION_TYPE_EMAIL, "e1"),
    )
    again = policy.recheck_target(moved, target)
    assert isinstance(again, policy.Target)
    assert again.subscription is not None
    assert (again.channel, again.subscription.subscription_id) == (Channel.TELEGRAM, "t2")
    # Webhooks need no subscription: only the profile's existence is checked.
    hook = policy.Target(0, Channel.WEBHOOK, None)
    assert policy.recheck_target(_user(), hook) is hook
