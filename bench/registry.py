"""The benchmark registry: ``@benchmark`` adds a function, in definition order."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from bench.context import Context
from bench.figure import Figure

BenchmarkFn = Callable[[Context], Awaitable[Figure | Sequence[Figure]]]


@dataclass(frozen=True)
class Benchmark:
    """One registered benchmark.

    Attributes:
        name: Selects it under ``--only``; a benchmark producing one figure is named after it.
        fn: The coroutine function; returns one figure or several.
        needs: Names of benchmarks whose figures ``fn`` reads with ``ctx.value``; they are
            registered earlier, run first (even when ``--only`` leaves them out), and a failure
            in one of them skips this one.
    """

    name: str
    fn: BenchmarkFn
    needs: tuple[str, ...] = ()

    @property
    def summary(self) -> str:
        """The first line of the function's docstring."""
        return (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else ""


class Registry:
    """Benchmarks in the order they run: the order their modules are listed in ``bench.suites``
    and, within a module, the order they are defined."""

    def __init__(self) -> None:
        self._benchmarks: dict[str, Benchmark] = {}

    def add(self, bench: Benchmark) -> None:
        """Registers a benchmark.

        Args:
            bench: The benchmark.

        Raises:
            ValueError: Its name is taken, or it needs one not registered before it (which
                would make the run order wrong).
        """
        if bench.name in self._benchmarks:
            raise ValueError(f"benchmark {bench.name!r} is registered twice")
        for need in bench.needs:
            if need not in self._benchmarks:
                raise ValueError(
                    f"benchmark {bench.name!r} needs {need!r}, which is not registered before it"
                    " (list its module earlier in bench/suites.py)"
                )
        self._benchmarks[bench.name] = bench

    def all(self) -> list[Benchmark]:
        """Every benchmark, in run order."""
        return list(self._benchmarks.values())

    def select(self, prefixes: Iterable[str] = ()) -> list[Benchmark]:
        """The benchmarks whose names start with one of ``prefixes``, plus what they need.

        Args:
            prefixes: Name prefixes; none selects everything.

        Returns:
            The selection, in run order.
        """
        wanted = list(prefixes)
        chosen = {b.name for b in self._benchmarks.values() if _matches(b.name, wanted)}
        # Walk backwards so a need of a need is pulled in too: needs always precede.
        for bench in reversed(self.all()):
            if bench.name in chosen:
                chosen.update(bench.needs)
        return [b for b in self._benchmarks.values() if b.name in chosen]


def _matches(name: str, prefixes: list[str]) -> bool:
    return not prefixes or any(name.startswith(p) for p in prefixes)


#: The one registry ``python -m bench`` runs.
REGISTRY = Registry()


def benchmark(name: str, *, needs: Sequence[str] = ()) -> Callable[[BenchmarkFn], BenchmarkFn]:
    """Registers a benchmark function in :data:`REGISTRY`.

    Args:
        name: Its name (see :class:`Benchmark`).
        needs: Benchmarks whose figures it reads.

    Returns:
        A decorator that returns the function unchanged.
    """

    def register(fn: BenchmarkFn) -> BenchmarkFn:
        REGISTRY.add(Benchmark(name=name, fn=fn, needs=tuple(needs)))
        return fn

    return register
