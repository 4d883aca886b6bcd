"""What a benchmark function is handed: the run's size, the stack, and figures measured so far."""

from __future__ import annotations

import sys
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

from bench.config import Size, Stack
from bench.figure import Figure
from bench.scratch import scratch_database, scratch_topic


class MissingFigureError(LookupError):
    """A benchmark asked for a figure that was not measured earlier in this run."""


@dataclass
class Context:
    """Shared state of one ``python -m bench`` run.

    Attributes:
        size: How much data to push through.
        stack: Where PostgreSQL and Kafka are.
        figures: Every figure measured so far in this run, by name, in order.
    """

    size: Size
    stack: Stack
    figures: dict[str, Figure] = field(default_factory=dict)

    def sized(self, *, tiny: int, full: int) -> int:
        """Picks the count for this run's size.

        Args:
            tiny: Count at ``--size tiny``: small enough that the whole run takes seconds.
            full: Count at the default full size.

        Returns:
            One of the two.
        """
        return tiny if self.size is Size.TINY else full

    def value(self, name: str) -> float:
        """The value of a figure measured earlier in this run, e.g. a ceiling to divide by.

        Declare the benchmark that measures it in ``needs=`` so that it runs first even under
        ``--only``.

        Args:
            name: The figure's name.

        Returns:
            Its value.

        Raises:
            MissingFigureError: It was not measured (not declared in ``needs``, or it failed).
        """
        try:
            return self.figures[name].value
        except KeyError:
            raise MissingFigureError(f"figure {name!r} was not measured in this run") from None

    def scratch_database(self) -> AbstractAsyncContextManager[str]:
        """A new empty database, dropped on exit; yields its DSN."""
        return scratch_database(self.stack)

    def scratch_topic(self, partitions: int = 12) -> AbstractAsyncContextManager[str]:
        """A new topic, deleted on exit; yields its name.

        Args:
            partitions: Partition count.
        """
        return scratch_topic(self.stack, partitions)

    def log(self, message: str) -> None:
        """Progress for whoever watches the run; stderr, so stdout keeps only the table.

        Args:
            message: One line.
        """
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
