"""``results.json`` and the table printed on stdout."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from bench.figure import Figure


def write_json(path: Path, figures: Sequence[Figure]) -> None:
    """Writes the figures as a JSON list, atomically so a reader never sees half a file.

    Args:
        path: Destination; its folder is created if missing.
        figures: What to write.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps([f.to_json() for f in figures], indent=2) + "\n")
    os.replace(tmp, path)


def format_table(figures: Sequence[Figure]) -> str:
    """An aligned plain-text table: name, value, unit, limit, ratio, target and whether it is met.

    Args:
        figures: The rows.

    Returns:
        The table, one line per figure after a header, no trailing newline.
    """
    header = ("figure", "value", "unit", "limit", "ratio", "target", "met")
    rows = [
        (
            f.name,
            _number(f.value),
            f.unit,
            "-" if f.limit is None else _number(f.limit),
            "-" if f.ratio_to_limit is None else f"{f.ratio_to_limit:.3f}",
            "-" if f.target is None else _number(f.target),
            {None: "-", True: "yes", False: "NO"}[f.meets_target],
        )
        for f in figures
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    # Text columns align left, numbers right, so magnitudes line up.
    right = (False, True, False, True, True, True, False)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _number(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"
