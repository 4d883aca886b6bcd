"""Measuring helpers: a process's peak memory, percentiles, elapsed time.

Memory figures (``*_peak_rss_mb``) are the child process's ``VmHWM`` ("high water mark": the
largest resident set it ever had), read from ``/proc/<pid>/status``. It is kept by the kernel,
so it catches a spike between two samples, but it is only readable while the process lives:
read it after the workload and before stopping the process, or use :class:`PeakRssWatcher` for
a process that exits on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

_KIB_PER_MIB = 1024


def _status_field_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            # e.g. "VmHWM:	  208864 kB"
            return int(line.split()[1])
    # Kernel threads and zombies have no memory lines.
    raise ProcessLookupError(f"process {pid} has no {field} (exited, or not a user process)")


def peak_rss_mb(pid: int) -> float:
    """The peak resident set size of a live process since it started (or since the last reset).

    Args:
        pid: The process; it must still be running (not yet reaped).

    Returns:
        Peak RSS in MiB.

    Raises:
        ProcessLookupError: No such process, or it has exited.
    """
    try:
        return _status_field_kib(pid, "VmHWM") / _KIB_PER_MIB
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}") from None


def rss_mb(pid: int) -> float:
    """The current resident set size of a live process.

    Args:
        pid: The process.

    Returns:
        RSS in MiB.

    Raises:
        ProcessLookupError: No such process, or it has exited.
    """
    try:
        return _status_field_kib(pid, "VmRSS") / _KIB_PER_MIB
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}") from None


def reset_peak_rss(pid: int) -> None:
    """Resets a process's peak RSS to its current RSS, so a later read covers only what follows.

    Use it after a service has started and warmed up, to measure one workload's peak rather
    than start-up's. Needs permission to write ``/proc/<pid>/clear_refs`` (same user or root).

    Args:
        pid: The process.
    """
    # "5" resets the high water mark (Linux >= 4.0, Documentation/filesystems/proc.rst).
    Path(f"/proc/{pid}/clear_refs").write_text("5")


class PeakRssWatcher:
    """Samples a process's peak RSS in the background until it exits or the watcher stops.

    For processes that exit by themselves, where ``VmHWM`` cannot be read afterwards: the last
    successful sample is kept. Because ``VmHWM`` only grows, a sample taken late catches every
    earlier spike; only growth in the last ``interval`` before exit can be missed.

    Use as ``async with PeakRssWatcher(pid) as watcher: ...`` then read ``watcher.peak_mb``.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        """Prepares a watcher.

        Args:
            pid: The process to watch.
            interval: Seconds between samples.
        """
        self.pid = pid
        self.interval = interval
        self.peak_mb = 0.0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> bool:
        """Takes one sample now.

        Returns:
            False once the process is gone.
        """
        try:
            self.peak_mb = max(self.peak_mb, peak_rss_mb(self.pid))
        except ProcessLookupError:
            return False
        return True

    async def _loop(self) -> None:
        # Polling is the point here: the kernel offers no notification of RSS growth.
        while True:
            if not self.sample():
                return
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> PeakRssWatcher:
        self.sample()
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.sample()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct``-th percentile by the nearest-rank method (a value that was really observed).

    Args:
        values: Samples, in any order; not empty.
        pct: In (0, 100], e.g. 99 for p99.

    Returns:
        The smallest sample such that at least ``pct`` percent of samples are at or below it.

    Raises:
        ValueError: No samples, or ``pct`` out of range.
    """
    if not values:
        raise ValueError("percentile of no samples")
    if not 0 < pct <= 100:
        raise ValueError(f"percentile {pct} is not in (0, 100]")
    ordered = sorted(values)
    rank = math.ceil(pct / 100 * len(ordered))
    return ordered[rank - 1]


class Stopwatch:
    """Elapsed wall time on the monotonic clock: ``with Stopwatch() as sw: ...; sw.seconds``."""

    def __init__(self) -> None:
        """Starts stopped; entering the ``with`` block starts it."""
        self.started = 0.0
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self.started = time.monotonic()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.seconds = time.monotonic() - self.started

    def rate(self, count: int) -> float:
        """Items per second over the measured time.

        Args:
            count: Items processed while the stopwatch ran.

        Returns:
            ``count / seconds``.
        """
        return count / self.seconds
