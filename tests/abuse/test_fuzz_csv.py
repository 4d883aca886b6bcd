"""Random CSV files for ImportUsers: a correct import or a clear error, never a half-applied one.

Hypothesis writes files in random dialects (delimiter, quote character, line ending), encodings
(UTF-8, UTF-8 with a byte order mark, Latin-1) and with nasty cells (delimiters, quotes and line
breaks inside cells, formula cells ``=1+2`` / ``+A1`` / ``@SUM(A1)``, huge cells, empty cells),
uploads them in random chunk sizes (records span chunks), and checks:

* well-formed files: the job SUCCEEDED, ``rows == created + updated + unchanged + rejected``,
  every row that was not rejected stored its cell exactly (trimmed, as documented; formulas
  verbatim and counted in ``flagged_cells``; no BOM in the header or ids), every plain row is
  there, and a rejected row wrote nothing;
* broken files (an unmatched quote, invalid bytes, NULs, a cut): a clear status or a FAILED job
  with its error, and then none of the file's users exists; or a SUCCEEDED job whose counts
  add up and which created exactly the users it counted — never a crash, a hang or half a file.
"""

from __future__ import annotations

import csv
import io
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tidings.identity.v1 import identity_service_pb2_grpc, import_pb2

from services.identity.csv_cells import looks_like_formula
from tests.abuse.conftest import Stack
from tests.abuse.rpc import M
from tests.identity.conftest import TestApp, create_test_app
from tests.identity.import_support import STRING, attribute, options

UNCLEAR = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.DATA_LOSS,
    }
)
Options = import_pb2.ImportOptions
Job = import_pb2.ImportJob
PLAIN = re.compile(r"[A-Za-z0-9 ]{0,100}")

FORMULAS = ["=1+2", "+A1", "-2+3", "@SUM(A1:A9)", '=HYPERLINK("http://x","y")', "=cmd|'/C calc'!A0"]


@dataclass(frozen=True)
class Dialect:
    delimiter: str
    quote: str
    newline: str
    encoding: str  # "utf-8", "utf-8-sig" or "latin-1"

    @property
    def proto_encoding(self) -> int:
        return Options.ENCODING_LATIN1 if self.encoding == "latin-1" else Options.ENCODING_UTF8


dialects = st.builds(
    Dialect,
    delimiter=st.sampled_from([",", ";", "\t", "|"]),
    quote=st.sampled_from(['"', "'"]),
    newline=st.sampled_from(["\r\n", "\n"]),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "latin-1"]),
)


#: Bytes 0x80-0x9F of a "Latin-1" file are read as Windows-1252 (what Excel writes), so the
#: C1 control characters the ISO codec would give them are not text such a file holds.
_C1 = "".join(chr(code) for code in range(0x80, 0xA0))


def cells(latin1: bool) -> st.SearchStrategy[str]:
    alphabet = st.characters(
        codec="latin-1" if latin1 else "utf-8",
        exclude_categories=["Cs"],
        exclude_characters="\x00" + (_C1 if latin1 else ""),
    )
    return st.one_of(
        st.from_regex(PLAIN, fullmatch=True),
        st.sampled_from(FORMULAS),
        st.sampled_from(["a,b;c|d\te", 'say "hi"', "it's", "two\nlines", "cr\r\nlf", " padded "]),
        st.text(alphabet=alphabet, max_size=30),
        st.sampled_from(["x" * 999, "y" * 1001, "z" * 200_000]),
    )


@st.composite
def csv_files(draw: st.DrawFn) -> tuple[Dialect, list[tuple[str, str]], bytes]:
    """A well-formed file: (dialect, [(external id, note)], bytes)."""
    dialect = draw(dialects)
    prefix = uuid.uuid4().hex[:12]
    notes = draw(st.lists(cells(dialect.encoding == "latin-1"), max_size=6))
    rows = [(f"fz-{prefix}-{i}", note) for i, note in enumerate(notes)]
    buffer = io.StringIO(newline="")
    writer = csv.writer(
        buffer,
        delimiter=dialect.delimiter,
        quotechar=dialect.quote,
        lineterminator=dialect.newline,
        # The writer quotes only line breaks of its own line terminator; a bare CR in a "\n"
        # file must be quoted too (RFC 4180), or the file is broken, not well-formed.
        quoting=csv.QUOTE_ALL
        if any("\r" in note or "\n" in note for note in notes)
        else csv.QUOTE_MINIMAL,
    )
    writer.writerow(["id", "note"])
    writer.writerows(rows)
    return dialect, rows, buffer.getvalue().encode(dialect.encoding)


@st.composite
def broken(draw: st.DrawFn, data: bytes, quote: str) -> bytes:
    """``data`` damaged in one of the ways real files are."""
    at = draw(st.integers(0, len(data)))
    damage = draw(st.sampled_from(["quote", "bytes", "nul", "cut", "header", "binary"]))
    if damage == "quote":
        return data[:at] + quote.encode() + data[at:]
    if damage == "bytes":
        return (
            data[:at]
            + draw(st.sampled_from([b"\xff\xfe", b"\xc3", b"\xe2\x82", b"\x80"]))
            + data[at:]
        )
    if damage == "nul":
        return data[:at] + b"\x00" + data[at:]
    if damage == "cut":
        return data[: max(at, 1)]
    if damage == "header":
        return b"\xef\xbb\xbf\xef\xbb\xbf" + data
    return draw(st.binary(min_size=1, max_size=300))


def chunks(data: bytes, size: int) -> list[bytes]:
    """``data`` in pieces of ``size`` bytes (at most ~64 pieces: a huge cell in 1-byte pieces
    would only measure gRPC)."""
    size = max(size, len(data) // 64)
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


@dataclass
class Importer:
    stub: Any
    app: TestApp

    def run(self, dialect: Dialect, data: bytes, chunk: int) -> Job | grpc.RpcError:
        opts = options(
            attribute("note", STRING),
            delimiter=dialect.delimiter,
            quote=dialect.quote,
            encoding=dialect.proto_encoding,
        )
        requests = [M.ImportUsersRequest(options=opts)] + [
            M.ImportUsersRequest(chunk=piece) for piece in chunks(data, chunk)
        ]
        try:
            job: Job = self.stub.ImportUsers(iter(requests), metadata=self.app.server, timeout=60)
        except grpc.RpcError as error:
            return error
        return job

    def existing(self, external_ids: list[str]) -> dict[str, Any]:
        """The users of ``external_ids`` that exist, by external id."""
        if not external_ids:
            return {}
        answer = self.stub.BatchGetUsers(
            M.BatchGetUsersRequest(refs=[{"external_id": e} for e in external_ids]),
            metadata=self.app.server,
            timeout=30,
        )
        return {
            external_id: result.user
            for external_id, result in zip(external_ids, answer.results, strict=True)
            if result.HasField("user")
        }


@pytest.fixture(scope="module")
async def importer(stack: Stack) -> AsyncIterator[Importer]:
    app = await create_test_app(stack.apps)
    channel = grpc.insecure_channel(stack.identity.grpc_target)
    yield Importer(identity_service_pb2_grpc.IdentityServiceStub(channel), app)
    channel.close()


def _counts_add_up(job: Job) -> None:
    assert job.rows == job.created + job.updated + job.unchanged + job.rejected, job


@settings(database=None)
@given(file=csv_files(), chunk=st.integers(1, 4096))
def test_well_formed_files_import_exactly(
    importer: Importer, file: tuple[Dialect, list[tuple[str, str]], bytes], chunk: int
) -> None:
    dialect, rows, data = file
    outcome = importer.run(dialect, data, chunk)
    assert isinstance(outcome, Job), f"{outcome} for {data[:300]!r}"
    job = outcome
    assert job.state == Job.STATE_SUCCEEDED, job
    assert job.rows == len(rows), job
    _counts_add_up(job)
    users = importer.existing([external_id for external_id, _ in rows])
    assert len(users) == job.created, (job, sorted(users))
    rejected_lines = {r.line for r in job.rejections}
    formulas = 0
    for line, (external_id, note) in enumerate(rows, start=2):
        user = users.get(external_id)
        if user is None:
            assert job.rejected > 0, f"row {line} is missing but nothing was rejected"
            assert not PLAIN.fullmatch(note), f"plain row {line} {note!r} rejected: {job}"
            if len(rejected_lines) == job.rejected:  # every rejection listed: name this one
                assert line in rejected_lines or any("\n" in n or "\r" in n for _, n in rows), (
                    line,
                    job.rejections,
                )
            continue
        stored = user.attributes["note"].string_value if "note" in user.attributes else ""
        # docs/imports.md: cells are trimmed; an empty cell leaves the field unset.
        assert stored == note.strip(), f"row {line}: stored {stored[:80]!r}, file had {note[:80]!r}"
        formulas += looks_like_formula(stored)
    # docs/imports.md: formula cells are stored as given and counted in flagged_cells (a
    # rejected row's formula may be counted too).
    in_file = sum(looks_like_formula(note.strip()) for _, note in rows)
    assert formulas <= job.flagged_cells <= in_file, job


@settings(database=None)
@given(data=st.data(), file=csv_files(), chunk=st.integers(1, 4096))
def test_broken_files_are_refused_whole_or_imported_consistently(
    importer: Importer,
    data: st.DataObject,
    file: tuple[Dialect, list[tuple[str, str]], bytes],
    chunk: int,
) -> None:
    dialect, rows, clean = file
    damaged = data.draw(broken(clean, dialect.quote))
    outcome = importer.run(dialect, damaged, chunk)
    users = importer.existing([external_id for external_id, _ in rows])
    if isinstance(outcome, grpc.RpcError):
        code = outcome.code()
        assert code not in UNCLEAR, f"{code.name}: {outcome.details()} for {damaged[:200]!r}"
        assert (outcome.details() or "").strip()
        assert users == {}, f"refused with {code.name} but wrote {sorted(users)}"
        return
    job = outcome
    if job.state == Job.STATE_FAILED:
        assert job.error.strip(), job
        assert users == {}, f"FAILED but wrote {sorted(users)}"
        return
    assert job.state == Job.STATE_SUCCEEDED, job
    _counts_add_up(job)
    assert len(users) <= job.created, (job, sorted(users))
