"""Client streams: telling an upload that finished from one whose client went away."""

from __future__ import annotations

import asyncio

__all__ = ["STREAM_END_GRACE", "confirm_stream_end"]

#: Seconds to wait, once a client stream's requests ended, for a cancellation to arrive.
STREAM_END_GRACE = 0.25


async def confirm_stream_end() -> None:
    """Wait before acting on a client stream as a whole, once its request iterator ended.

    grpc.aio ends the request iterator when the client goes away exactly as when it finished
    sending, and cancels the handler only just after (measured: every time, within
    milliseconds). Waiting here lets that cancellation arrive (it interrupts the wait), so an
    upload cut off mid-file is never taken for the whole file.
    """
    await asyncio.sleep(STREAM_END_GRACE)
