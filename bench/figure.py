"""One measured figure and its JSON form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Figure:
    """A named measurement, optionally compared with a limit measured in the same run.

    Attributes:
        name: Dotted figure name (``ceiling.pg_copy_rows_per_s``); names in DESIGN.md are fixed.
        value: The measurement.
        unit: Unit of ``value`` and ``limit`` (``rows/s``, ``ms``, ``MiB``...).
        limit: A ceiling of the same operation measured in the same run (our import rate vs a
            bare ``COPY``), or ``None`` when nothing applies. Never a target.
        target: What the issue asks for (``>= target`` for rates, ``<= target`` for times and
            sizes), or ``None``.
    """

    name: str
    value: float
    unit: str
    limit: float | None = None
    target: float | None = None

    @property
    def higher_is_better(self) -> bool:
        """Rates (``.../s``) are better high; times and sizes are better low."""
        return self.unit.endswith("/s")

    @property
    def meets_target(self) -> bool | None:
        """Whether ``value`` reaches ``target``, or ``None`` without one."""
        if self.target is None:
            return None
        if self.higher_is_better:
            return self.value >= self.target
        return self.value <= self.target

    @property
    def ratio_to_limit(self) -> float | None:
        """``value / limit``, or ``None`` without a (non-zero) limit."""
        if self.limit is None or self.limit == 0:
            return None
        return self.value / self.limit

    def to_json(self) -> dict[str, Any]:
        """The figure as one entry of ``results.json``.

        Returns:
            ``{"name", "value", "unit", "limit", "ratio_to_limit", "target", "meets_target"}``,
            numbers rounded so the file diffs readably between runs.
        """
        ratio = self.ratio_to_limit
        return {
            "name": self.name,
            "value": _round(self.value),
            "unit": self.unit,
            "limit": None if self.limit is None else _round(self.limit),
            "ratio_to_limit": None if ratio is None else round(ratio, 4),
            "target": None if self.target is None else _round(self.target),
            "meets_target": self.meets_target,
        }


def _round(number: float) -> float:
    # Three decimals keep milliseconds meaningful; rates in the 100k range need none.
    return round(number, 3) if abs(number) < 1000 else round(number, 1)
