"""The benchmark harness works: a tiny run writes well-formed results, and its helpers behave.

Nothing here times anything: the figures of a tiny run are meaningless and only checked > 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.context import Context
from bench.figure import Figure
from bench.measure import peak_rss_mb, percentile, reset_peak_rss
from bench.registry import Benchmark, Registry

ROOT = Path(__file__).resolve().parents[2]
CEILINGS = {
    "ceiling.pg_copy_rows_per_s",
    "ceiling.pg_upsert_rows_per_s",
    "ceiling.kafka_msgs_per_s",
    "ceiling.timer_claims_per_s",
    "ceiling.pg_copy_events_indexed_per_s",
    "ceiling.grpc_unary_calls_per_s",
}


def test_tiny_run_writes_every_ceiling(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen")])}
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--size", "tiny", "--output", str(output)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    results = json.loads(output.read_text())
    assert isinstance(results, list)
    for entry in results:
        assert set(entry) == {
            "name",
            "value",
            "unit",
            "limit",
            "ratio_to_limit",
            "target",
            "meets_target",
        }
        assert isinstance(entry["name"], str)
        assert isinstance(entry["unit"], str)
        assert isinstance(entry["value"], int | float)
        if entry["limit"] is None:
            assert entry["ratio_to_limit"] is None
    values = {entry["name"]: entry["value"] for entry in results}
    assert set(values) >= CEILINGS
    assert all(values[name] > 0 for name in CEILINGS)
    # The table on stdout names every figure.
    assert all(name in run.stdout for name in values)


async def _noop(ctx: Context) -> Figure:
    return Figure("x", 1.0, "u")


def test_only_pulls_in_what_a_benchmark_needs() -> None:
    registry = Registry()
    registry.add(Benchmark("ceiling.a", _noop))
    registry.add(Benchmark("ceiling.b", _noop))
    registry.add(Benchmark("svc.c", _noop, needs=("ceiling.b",)))
    registry.add(Benchmark("svc.d", _noop, needs=("svc.c",)))
    assert [b.name for b in registry.select(["svc.d"])] == ["ceiling.b", "svc.c", "svc.d"]
    assert [b.name for b in registry.select(["ceiling."])] == ["ceiling.a", "ceiling.b"]
    assert len(registry.select()) == 4


def test_a_need_must_be_registered_first() -> None:
    registry = Registry()
    with pytest.raises(ValueError, match="not registered before it"):
        registry.add(Benchmark("svc.c", _noop, needs=("ceiling.b",)))


def test_ratio_to_limit() -> None:
    assert Figure("x", 50.0, "rows/s", limit=200.0).to_json()["ratio_to_limit"] == 0.25
    assert Figure("x", 50.0, "rows/s").to_json()["ratio_to_limit"] is None


def test_meets_target_knows_which_way_is_better() -> None:
    assert Figure("x", 50.0, "rows/s", target=40.0).meets_target is True
    assert Figure("x", 50.0, "rows/s", target=60.0).meets_target is False
    assert Figure("x", 50.0, "ms", target=60.0).meets_target is True
    assert Figure("x", 50.0, "MiB", target=40.0).meets_target is False
    assert Figure("x", 50.0, "ms").to_json()["meets_target"] is None


def test_percentile_is_an_observed_value() -> None:
    samples = [float(v) for v in range(1, 101)]
    assert percentile(samples, 99) == 99.0
    assert percentile(samples, 100) == 100.0
    assert percentile([7.0], 50) == 7.0


def test_peak_rss_of_a_child_sees_a_freed_spike() -> None:
    # The child allocates ~100 MiB, frees it, says so, then waits for us to read its peak.
    code = (
        "import sys; b = bytearray(100 * 1024 * 1024); del b;"
        " print('freed', flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "freed"
        assert peak_rss_mb(child.pid) >= 100
        reset_peak_rss(child.pid)
        assert peak_rss_mb(child.pid) < 100
    finally:
        child.kill()
        child.wait()
