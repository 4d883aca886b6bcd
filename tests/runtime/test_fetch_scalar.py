"""A big count read with ``fetch_scalar`` may run in parallel; read as one row it may not.

PostgreSQL starts no parallel workers for a portal executed with a row limit, which is how
asyncpg's ``fetchval`` reads. auto_explain, at NOTICE level, sends each plan as it ran to the
client.
"""

from __future__ import annotations

import re

import asyncpg

from services.runtime.db import fetch_scalar

ROWS = 200_000
COUNT = "SELECT count(*) FROM wide WHERE n % 7 = 0"


def _launched(plan: str) -> int:
    return sum(int(n) for n in re.findall(r"Workers Launched: (\d+)", plan))


async def test_a_count_read_whole_gets_its_parallel_workers(scratch_db: str) -> None:
    conn = await asyncpg.connect(scratch_db)
    notices: list[str] = []
    try:
        await conn.execute(f"CREATE TABLE wide AS SELECT g AS n FROM generate_series(1, {ROWS}) g")
        await conn.execute("ANALYZE wide")
        # Any scan is worth two workers here, and every plan is reported to this client.
        for setting in (
            "parallel_setup_cost = 0",
            "parallel_tuple_cost = 0",
            "min_parallel_table_scan_size = 0",
            "max_parallel_workers_per_gather = 2",
        ):
            await conn.execute(f"SET {setting}")
        await conn.execute("LOAD 'auto_explain'")
        for setting in ("log_min_duration = 0", "log_analyze = on", "log_level = notice"):
            await conn.execute(f"SET auto_explain.{setting}")
        conn.add_log_listener(lambda _conn, message: notices.append(str(message.message)))

        whole = await fetch_scalar(conn, COUNT)
        whole_plan = "\n".join(notices)
        notices.clear()
        one_row = await conn.fetchval(COUNT)
        one_row_plan = "\n".join(notices)
    finally:
        await conn.close()

    assert whole == one_row == ROWS // 7
    assert "Workers Planned: 2" in whole_plan
    assert "Workers Planned: 2" in one_row_plan
    assert _launched(one_row_plan) == 0  # why fetch_scalar exists
    assert _launched(whole_plan) > 0
