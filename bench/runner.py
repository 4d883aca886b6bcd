"""Runs selected benchmarks one after another and collects their figures."""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.context import Context
from bench.figure import Figure
from bench.registry import Benchmark


@dataclass
class Outcome:
    """What a run produced.

    Attributes:
        figures: Every figure, in the order measured.
        failed: Names of benchmarks that raised.
        skipped: Names of benchmarks not run because something they need failed.
        seconds: Wall time of the whole run.
    """

    figures: list[Figure] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether every selected benchmark ran and succeeded."""
        return not self.failed and not self.skipped


async def run(benchmarks: Sequence[Benchmark], ctx: Context) -> Outcome:
    """Runs benchmarks sequentially: on 2 cores, anything concurrent would skew the others.

    A failure is logged and the run goes on with the benchmarks that do not depend on it, so one
    broken benchmark does not hide every other figure.

    Args:
        benchmarks: In run order (needs first), as :meth:`Registry.select` returns them.
        ctx: The run's context; measured figures are added to ``ctx.figures``.

    Returns:
        The outcome.
    """
    outcome = Outcome()
    started = time.monotonic()
    for bench in benchmarks:
        missing = [n for n in bench.needs if n in outcome.failed or n in outcome.skipped]
        if missing:
            ctx.log(f"{bench.name}: skipped, it needs {', '.join(missing)}")
            outcome.skipped.append(bench.name)
            continue
        ctx.log(f"{bench.name}: running ({ctx.size} size)")
        t0 = time.monotonic()
        try:
            result = await bench.fn(ctx)
        except Exception:
            ctx.log(f"{bench.name}: FAILED\n{traceback.format_exc()}")
            outcome.failed.append(bench.name)
            continue
        figures = [result] if isinstance(result, Figure) else list(result)
        for figure in figures:
            ctx.figures[figure.name] = figure
            outcome.figures.append(figure)
        ctx.log(f"{bench.name}: done in {time.monotonic() - t0:.1f} s")
    outcome.seconds = time.monotonic() - started
    return outcome
