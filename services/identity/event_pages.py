"""Pages of stored events bounded by bytes as well as by count (ListEvents, ExportUser).

An event's properties may take 64 KiB, so a page of a thousand events could take 64 MB, and a
gRPC client refuses an answer over 4 MB unless told otherwise (grpcurl and every stock client
included). A page therefore stops at :data:`MAX_PAGE_BYTES` of events, measured on the messages
the answer carries, and its token continues after the last event it holds. Rows are read in
chunks of :data:`FETCH_ROWS`, so a page never loads more than it may send.

The cursor is ``(occurred_at, event_id)`` of the last event served, in microseconds since the
epoch, in a token of :mod:`services.runtime.paging` that names the list (and the query) it
belongs to.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

from google.protobuf.message import Message

from services.identity.events_store import Event
from services.runtime import paging

__all__ = [
    "FETCH_ROWS",
    "MAX_PAGE_BYTES",
    "Cursor",
    "Fetch",
    "Page",
    "decode_cursor",
    "encode_cursor",
    "fill_page",
]

#: Most bytes of events in one answer: under the 4 MB a gRPC client accepts by default, with
#: room for the rest of the answer (ExportUser's profile and merges).
MAX_PAGE_BYTES = 3 * 1024 * 1024
#: Rows read per query while a page fills (at most ~6.4 MB of properties in memory at once).
FETCH_ROWS = 100
#: What a repeated message field adds to each element: its tag and a length prefix of up to
#: 4 bytes (elements stay under 2 MiB).
_ELEMENT_OVERHEAD = 5

#: ``(occurred_at, event_id)`` of the last event served.
Cursor = tuple[datetime, str]
#: Reads up to ``limit`` events after a cursor (``None``: from the start), in page order.
Fetch = Callable[[Cursor | None, int], Awaitable[list[Event]]]

M = TypeVar("M", bound=Message)


@dataclass(frozen=True, slots=True)
class Page(Generic[M]):
    """A filled page.

    Attributes:
        items: The rendered events, in page order.
        next_cursor: Where the next page starts; ``None`` when this page has the last event.
    """

    items: list[M]
    next_cursor: Cursor | None


def _cursor(event: Event) -> Cursor:
    return event.occurred_at, event.event_id


async def fill_page(
    fetch: Fetch,
    render: Callable[[Event], M],
    *,
    after: Cursor | None,
    limit: int,
    max_bytes: int = MAX_PAGE_BYTES,
) -> Page[M]:
    """Up to ``limit`` events after ``after``, rendered, stopping before ``max_bytes``.

    The first event is always taken (one event is far below any budget), so a page is never
    empty while events remain.

    Args:
        fetch: Reads the events, in page order.
        render: The message an event is answered as; its size is what counts.
        after: The cursor of a page token, or ``None`` for the first page.
        limit: Most events on the page.
        max_bytes: Most bytes of rendered events on the page.
    """
    items: list[M] = []
    used = 0
    cursor = after
    while True:
        chunk = min(limit - len(items), FETCH_ROWS)
        # One row more than wanted tells whether anything follows the chunk.
        rows = await fetch(cursor, chunk + 1)
        for event in rows[:chunk]:
            message = render(event)
            size = message.ByteSize() + _ELEMENT_OVERHEAD
            if items and used + size > max_bytes:
                return Page(items, cursor)
            items.append(message)
            used += size
            cursor = _cursor(event)
        if len(rows) <= chunk:
            return Page(items, None)
        if len(items) >= limit:
            return Page(items, cursor)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _epoch_micros(moment: datetime) -> int:
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def encode_cursor(list_name: str, cursor: Cursor) -> str:
    """The opaque page token of ``cursor`` in the list ``list_name``."""
    occurred_at, event_id = cursor
    return paging.encode_page_token(
        list_name, {"t": str(_epoch_micros(occurred_at)), "e": event_id}
    )


def decode_cursor(list_name: str, token: str, field: str = "page_token") -> Cursor:
    """The cursor in a token of :func:`encode_cursor`.

    Raises:
        InvalidArgument: Naming ``field`` if the token is malformed or of another list.
    """
    position = paging.decode_page_token(list_name, token, field)
    try:
        return _EPOCH + timedelta(microseconds=int(position["t"])), position["e"]
    except (KeyError, ValueError, OverflowError):
        raise paging.bad_page_token(field) from None
