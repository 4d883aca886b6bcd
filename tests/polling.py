"""Waiting for something another process does: the suite's one polling helper."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

__all__ = ["eventually"]

T = TypeVar("T")


@overload
async def eventually(
    check: Callable[[], Awaitable[T]],
    accept: Callable[[T], object] = ...,
    *,
    within: float = ...,
    interval: float = ...,
    what: str = ...,
) -> T: ...


@overload
async def eventually(
    check: Callable[[], T],
    accept: Callable[[T], object] = ...,
    *,
    within: float = ...,
    interval: float = ...,
    what: str = ...,
) -> T: ...


async def eventually(
    check: Callable[[], Any],
    accept: Callable[[Any], object] = bool,
    *,
    within: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll ``check`` (plain or async) until ``accept`` holds for its answer, and return that
    answer; by default until the answer is truthy.

    Raises:
        TimeoutError: Not within ``within`` seconds (the message has the last answer).
    """
    deadline = time.monotonic() + within
    while True:
        answer = check()
        result = await answer if inspect.isawaitable(answer) else answer
        if accept(result):
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {within}s; last: {result!r}")
        await asyncio.sleep(interval)
