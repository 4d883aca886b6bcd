"""Reading a CSV file that arrives in chunks: decoding, records, physical line numbers.

:class:`CsvStream` is fed the file's bytes in pieces of any size (:meth:`CsvStream.feed`) and
yields records as soon as they are complete, so a file of any size is read with memory bounded
by the chunk size (plus one record). Each record carries the physical line it starts on (the
header is line 1), which is what an editor shows next to a rejected row.

* Decoding: UTF-8 (a leading byte order mark is dropped) or Latin-1, incrementally so a
  multi-byte character split between chunks is fine. Bytes that are not UTF-8 are kept as
  lone surrogates (``surrogateescape``) and the record they are in is marked
  (:attr:`Record.bad_encoding`), so one bad row is refused, not the file. "Latin-1" is read
  as the files that claim it really are (Excel's "CSV" on Windows): Windows-1252, whose bytes
  0x80-0x9F are the euro sign, curly quotes, dashes... rather than control characters; the
  five it leaves undefined (0x81, 0x8D, 0x8F, 0x90, 0x9D) stay Latin-1's.
* Parsing: Python's ``csv`` module (RFC 4180: quoted fields may hold delimiters, quotes as
  ``""`` and line breaks), ``strict`` so a malformed quote is a refused row
  (:attr:`Record.error`) rather than silently merged text. Records end at ``\\n``, ``\\r\\n``
  or ``\\r``. Blank lines are skipped, and so are records whose cells are all empty or
  spaces (``,,,,``: what spreadsheets write for the empty rows at the end of a sheet).
* A record still open at the end of a chunk (a quoted field spanning chunks) waits for the
  next one; a record or a field longer than :data:`MAX_RECORD_CHARS` means an unclosed quote,
  and the file cannot be read past it (:class:`UnreadableFile`).
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["MAX_LINES", "MAX_RECORD_CHARS", "CsvStream", "Record", "UnreadableFile"]

#: Longest record: past this, an opening quote was never closed.
MAX_RECORD_CHARS = 1 << 20
#: Most lines in a file (line numbers make ids: 32 bits of them).
MAX_LINES = (1 << 32) - 1
_SURROGATE = re.compile("[\udc80-\udcff]")
#: The "latin-1" decoding table: Windows-1252 where it defines a byte, Latin-1 elsewhere.
_LATIN1_TABLE = "".join(
    bytes([byte]).decode("cp1252", errors="ignore") or chr(byte) for byte in range(256)
)
_END_OF_DATA = "unexpected end of data"
_FIELD_LIMIT = "field larger than field limit"
# The csv module's limit is process-wide (128 KiB by default): one record's limit for all.
csv.field_size_limit(max(csv.field_size_limit(), MAX_RECORD_CHARS))


def _has_value(cells: list[str]) -> bool:
    """Whether a record is a row: not a blank line, nor only delimiters and spaces."""
    # Stops at the first cell with a value: one call for almost every row.
    return any(map(str.strip, cells))


class UnreadableFile(Exception):
    """The file cannot be read any further (its message says where and why)."""


@dataclass(slots=True)
class Record:
    """One CSV record.

    Attributes:
        line: Physical line the record starts on (1-based).
        cells: Its cells; empty when ``error`` is set.
        error: Why the record could not be parsed (malformed quoting), else empty.
        bad_encoding: Whether a cell holds bytes that are not valid in the file's encoding
            (kept as lone surrogates).
    """

    line: int
    cells: list[str]
    error: str = ""
    bad_encoding: bool = False


class _Latin1Decoder:
    """Decodes :data:`_LATIN1_TABLE`'s way: a byte is a character, so no state is kept."""

    def decode(self, data: bytes, final: bool = False) -> str:
        return codecs.charmap_decode(data, "strict", _LATIN1_TABLE)[0]


class CsvStream:
    """Incremental CSV reader.

    Args:
        encoding: ``utf-8`` or ``latin-1`` (read as Windows-1252, see the module's notes).
        delimiter: Field delimiter.
        quote: Quote character.
    """

    def __init__(self, *, encoding: str, delimiter: str, quote: str) -> None:
        self._utf8 = encoding == "utf-8"
        self._decoder = (
            codecs.getincrementaldecoder(encoding)(errors="surrogateescape")
            if self._utf8
            else _Latin1Decoder()
        )
        self._dialect = {
            "delimiter": delimiter,
            "quotechar": quote,
            "doublequote": True,
            "strict": True,
            "skipinitialspace": False,
        }
        self._pending = ""
        self._first = True
        #: Physical lines handed to the parser so far.
        self._lines_done = 0
        self.bytes_read = 0

    def feed(self, data: bytes) -> Iterator[Record]:
        """The records completed by ``data`` (the next bytes of the file).

        Raises:
            UnreadableFile: A record has been open for more than :data:`MAX_RECORD_CHARS`.
        """
        self.bytes_read += len(data)
        text = self._decode(data, final=False)
        return self._records(text, final=False)

    def finish(self) -> Iterator[Record]:
        """The last records, once the whole file was fed."""
        return self._records(self._decode(b"", final=True), final=True)

    def _decode(self, data: bytes, *, final: bool) -> str:
        text: str = self._decoder.decode(data, final)
        if self._first and text:
            self._first = False
            if self._utf8 and text.startswith("\ufeff"):
                text = text[1:]
        return text

    def _records(self, text: str, *, final: bool) -> Iterator[Record]:
        text = self._pending + text
        if final:
            block, self._pending = text, ""
        else:
            cut = text.rfind("\n")
            if cut < 0:
                # Old Mac line ends, or a long record: a final "\r" may be half of "\r\n".
                cut = text.rfind("\r", 0, len(text) - 1)
            block, self._pending = text[: cut + 1], text[cut + 1 :]
        if not block:
            self._check_pending()
            return
        lines = io.StringIO(block, newline="").readlines()
        yield from self._parse(lines, final=final, suspect=_SURROGATE.search(block) is not None)
        self._check_pending()

    def _parse_whole(self, lines: list[str], *, suspect: bool) -> list[Record] | None:
        """The records of ``lines`` when each is one line and all parse: the usual block,
        read by the csv module in one go. None otherwise (a record spanning lines, one still
        open at the end, malformed quoting), for :meth:`_parse` to read record by record."""
        try:
            rows = list(csv.reader(lines, **self._dialect))  # type: ignore[arg-type]
        except csv.Error:
            return None
        if len(rows) != len(lines):
            return None
        base = self._lines_done
        self._lines_done = base + len(lines)
        if suspect:
            return [
                Record(base + n, cells, bad_encoding=any(map(_SURROGATE.search, cells)))
                for n, cells in enumerate(rows, 1)
                if _has_value(cells)
            ]
        return [Record(base + n, cells) for n, cells in enumerate(rows, 1) if _has_value(cells)]

    def _check_pending(self) -> None:
        if self._lines_done > MAX_LINES:
            raise UnreadableFile(f"the file has more than {MAX_LINES:,} lines")
        if len(self._pending) > MAX_RECORD_CHARS:
            raise UnreadableFile(
                f"line {self._lines_done + 1}: a record runs past {MAX_RECORD_CHARS:,} "
                "characters; a quoted field is probably not closed (check options.quote)"
            )

    def _parse(self, lines: list[str], *, final: bool, suspect: bool) -> Iterator[Record]:
        whole = self._parse_whole(lines, suspect=suspect)
        if whole is not None:
            yield from whole
            return
        reader = csv.reader(lines, **self._dialect)  # type: ignore[arg-type]
        base = self._lines_done
        done = 0  # lines of this block consumed by complete records
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                if str(exc).startswith(_FIELD_LIMIT):
                    raise UnreadableFile(
                        f"line {base + done + 1}: a field runs past {MAX_RECORD_CHARS:,} "
                        "characters; a quoted field is probably not closed (check options.quote)"
                    ) from None
                if str(exc) == _END_OF_DATA:
                    if not final:
                        # The last record goes on in the next chunk: parse it again then.
                        self._pending = "".join(lines[done:]) + self._pending
                        self._lines_done = base + done
                        return
                    yield Record(
                        line=base + done + 1,
                        cells=[],
                        error="a quoted field is not closed before the end of the file",
                    )
                else:
                    yield Record(line=base + done + 1, cells=[], error=f"malformed CSV: {exc}")
                done = reader.line_num
                continue
            line = base + done + 1
            done = reader.line_num
            if not _has_value(cells):
                continue  # a blank line, or only delimiters
            bad = suspect and any(_SURROGATE.search(cell) for cell in cells)
            yield Record(line=line, cells=cells, bad_encoding=bad)
        self._lines_done = base + done
