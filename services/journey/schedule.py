"""Time in the customer's zone: delays, local times of day, birthdays — and the rules for days
and times that do not exist.

* The zone is the profile's ``timezone``; without one, the app's default time zone (identity's
  ``AppSettings.default_timezone``, see :meth:`services.journey.peers.Peers.default_zone`);
  an unknown one, or none at all, is UTC.
* A delay of whole days ("wait 2 days") keeps the local wall time: 09:00 plus one day is 09:00
  the next day even across a DST change (23 or 25 hours); other durations are exact.
* A local time that does not exist on a day (the spring-forward gap) is taken as the same
  number of minutes past the gap: 02:30 on a day clocks jump 02:00→03:00 is 03:30. A local time
  that happens twice (the autumn fold) is the first of the two.
* Birthdays on February 29 are celebrated on February 28 in years that have no February 29.
"""

from __future__ import annotations

import functools
import zoneinfo
from collections.abc import Collection
from datetime import UTC, date, datetime, time, timedelta, tzinfo

__all__ = [
    "add_delay",
    "birthday_entry",
    "in_whole_days",
    "local_wall",
    "next_local_time",
    "zone_of",
]


@functools.lru_cache(maxsize=1024)
def zone_of(name: str) -> tzinfo:
    """The IANA zone ``name``, or UTC when empty or unknown."""
    if not name:
        return UTC
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return UTC


def local_wall(day: date, at: time, zone: tzinfo) -> datetime:
    """The UTC instant of wall time ``at`` on ``day`` in ``zone`` (gap and fold rules above)."""
    naive = datetime.combine(day, at)
    # fold=0 takes the offset in force before a transition: in a gap that lands the same
    # minutes past the gap; in a fold, the first occurrence.
    return naive.replace(tzinfo=zone, fold=0).astimezone(UTC)


def in_whole_days(length: timedelta) -> bool:
    """Whether a delay is whole days, which keep the local wall time (so need the zone)."""
    return length.seconds == 0 and length.microseconds == 0 and length.days > 0


def add_delay(start: datetime, length: timedelta, zone: tzinfo) -> datetime:
    """``start`` plus a delay: whole days in local wall time, anything else exactly."""
    if in_whole_days(length):
        local = start.astimezone(zone)
        day = local.date() + timedelta(days=length.days)
        return local_wall(day, local.time().replace(tzinfo=None), zone)
    return start + length


def next_local_time(now: datetime, at: time, days: Collection[int], zone: tzinfo) -> datetime:
    """The first instant after ``now`` at local time ``at`` on an allowed ISO weekday (1=Monday;
    empty: every day)."""
    today = now.astimezone(zone).date()
    for offset in range(0, 8):
        day = today + timedelta(days=offset)
        if days and day.isoweekday() not in days:
            continue
        moment = local_wall(day, at, zone)
        if moment > now:
            return moment
    raise AssertionError("a week always has an allowed day")  # pragma: no cover


def _celebrated(year: int, month: int, day: int) -> date:
    try:
        return date(year, month, day)
    except ValueError:
        return date(year, 2, 28)  # February 29 outside leap years


def birthday_entry(
    now: datetime,
    zone: tzinfo,
    month: int,
    day: int,
    days_offset: int,
    at: time,
    *,
    after_year: int | None = None,
) -> tuple[datetime, int]:
    """When a customer next enters a birthday journey, and the birthday year it is for.

    The entry day is the birthday (as celebrated that year) plus ``days_offset``, at local time
    ``at``. An entry day that is today but whose time has passed is due now (late, not skipped).

    Args:
        now: The current time.
        zone: The customer's zone.
        month: Birth month.
        day: Birth day.
        days_offset: Days after the birthday (negative: before).
        at: Local time of the entry.
        after_year: Only birthdays of later years (the one just entered is done).

    Returns:
        ``(due instant in UTC, birthday year)``.
    """
    today = now.astimezone(zone).date()
    for year in range(today.year - 1, today.year + 3):
        if after_year is not None and year <= after_year:
            continue
        entry_day = _celebrated(year, month, day) + timedelta(days=days_offset)
        if entry_day < today:
            continue
        return max(local_wall(entry_day, at, zone), now) if entry_day == today else local_wall(
            entry_day, at, zone
        ), year
    raise AssertionError("some year ahead has the birthday")  # pragma: no cover
