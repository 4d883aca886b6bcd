"""Command line: ``python -m bench [--size tiny|full] [--only PREFIX]... [--output PATH]``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import suites
from bench.config import KAFKA_BOOTSTRAP_ENV, PG_ADMIN_DSN_ENV, Size, Stack
from bench.context import Context
from bench.preflight import check_stack
from bench.registry import REGISTRY
from bench.report import format_table, write_json
from bench.runner import run

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The parsed options.
    """
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Runs Tidings' benchmarks against the local stack and writes results.json.",
    )
    parser.add_argument(
        "--size",
        type=Size,
        choices=list(Size),
        default=Size.FULL,
        help="tiny: seconds, proves the harness works (CI); full (default): real figures",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PREFIX",
        help="run benchmarks whose name starts with PREFIX (repeatable), plus what they need",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        metavar="PATH",
        help=f"where to write the JSON results (default: {DEFAULT_OUTPUT})",
    )
    parser.add_argument(
        "--list", action="store_true", help="list the benchmarks that would run, and exit"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmarks.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status: 0 when every selected benchmark succeeded, 1 when one failed or was
        skipped or the stack is unreachable, 2 when ``--only`` selected nothing.
    """
    args = parse_args(argv)
    suites.load()
    selected = REGISTRY.select(args.only)
    if not selected:
        print(f"no benchmark matches {args.only}", file=sys.stderr)
        return 2
    if args.list:
        for bench in selected:
            print(f"{bench.name:40} {bench.summary}")
        return 0

    ctx = Context(size=args.size, stack=Stack.from_env())
    problems = asyncio.run(check_stack(ctx.stack))
    if problems:
        for problem in problems:
            print(f"bench: {problem}", file=sys.stderr)
        print(
            f"bench: is the stack running? `scripts/stack.sh up` starts it; set"
            f" {PG_ADMIN_DSN_ENV} / {KAFKA_BOOTSTRAP_ENV} to use another one",
            file=sys.stderr,
        )
        return 1
    outcome = asyncio.run(run(selected, ctx))
    # Written even after a failure: the figures that were measured are still worth having.
    write_json(args.output, outcome.figures)
    print(format_table(outcome.figures))
    print(
        f"\n{len(outcome.figures)} figures in {outcome.seconds:.1f} s ({args.size} size)"
        f" -> {args.output}"
    )
    if not outcome.ok:
        failed = ", ".join(outcome.failed) or "-"
        skipped = ", ".join(outcome.skipped) or "-"
        print(f"failed: {failed}; skipped: {skipped}", file=sys.stderr)
        return 1
    return 0
