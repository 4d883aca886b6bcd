"""The one place that lists benchmark modules, in run order.

A module registers its benchmarks with ``@benchmark`` when imported. Ceilings come first, so
every later benchmark can divide by them. To add benchmarks, write a module and list it here.
"""

from __future__ import annotations

import importlib

SUITES: tuple[str, ...] = (
    "bench.ceiling.postgres",
    "bench.ceiling.timers",
    "bench.ceiling.kafka",
    "bench.ceiling.grpc",
    "bench.identity",
    "bench.delivery",
    "bench.journey",
    "bench.identity_import",
    "bench.identity_segments",
)


def load() -> None:
    """Imports every suite, registering its benchmarks (importing twice is harmless)."""
    for module in SUITES:
        importlib.import_module(module)
