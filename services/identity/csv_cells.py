"""CSV cells a spreadsheet would run as a formula: how imports flag them, how exports defuse them.

A cell starting with ``=``, ``+``, ``-`` or ``@`` is a formula to Excel, LibreOffice and Google
Sheets (CSV injection: ``=HYPERLINK(...)``, ``=cmd|' /C calc'!A0``). Identity stores such values
as given (they are data), counts them when importing (:func:`looks_like_formula`), and every CSV
it writes goes through :func:`csv_text`, which prefixes them with ``'`` so a spreadsheet shows
them as text. One helper for every writer (ExportImportRejections, the CLI's rejection file), so
no writer can forget.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence

__all__ = ["FORMULA_PREFIXES", "csv_text", "looks_like_formula", "neutralise"]

#: First characters that make a spreadsheet evaluate a cell.
FORMULA_PREFIXES = ("=", "+", "-", "@")
#: Also defused on export: a leading tab or carriage return can hide a formula behind it.
_DEFUSED_PREFIXES = (*FORMULA_PREFIXES, "\t", "\r")


def looks_like_formula(cell: str) -> bool:
    """Whether a spreadsheet would evaluate ``cell`` as a formula."""
    return cell.startswith(FORMULA_PREFIXES)


def neutralise(cell: object) -> str:
    """``cell`` as text a spreadsheet shows literally (a ``'`` before a formula-like value)."""
    text = "" if cell is None else str(cell)
    return "'" + text if text.startswith(_DEFUSED_PREFIXES) else text


def csv_text(rows: Iterable[Sequence[object]]) -> str:
    """CSV lines (RFC 4180, ``\\r\\n`` endings) for ``rows``, every cell :func:`neutralise`-d."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerows([neutralise(cell) for cell in row] for row in rows)
    return buffer.getvalue()
