"""Journey statistics, counted from the recorded facts over a time range.

* entered / refused: ``entries`` rows (one per customer and trigger) in the range;
* per node, entered: path steps that arrived in the range; exited and per output: path steps
  that left in the range (``(goal)`` departures are the node's conversions; ``(stopped)``,
  ``(removed)``, ``(moved)``, ``(exit)`` count as exits but are not outputs);
* per send node, sent: arrivals (each arrival requests exactly one send); delivered, opened,
  clicked, failed: distinct sends with such a receipt in the range (failed includes bounced);
* waiting: customers at the node now (whatever the range);
* converted: goal departures in the range; conversion rate = converted / entered.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
from tidings.journey.v1 import journey_pb2 as jpb

from services.journey import journeys_store
from services.journey.definitions import node_kind
from services.journey.journeys import not_found

__all__ = ["JourneyCounts", "NodeCounts", "journey_stats"]

_FAR_PAST = datetime.fromisoformat("0001-01-02T00:00:00+00:00")
_FAR_FUTURE = datetime.fromisoformat("9999-12-30T00:00:00+00:00")


@dataclass
class NodeCounts:
    """Counts of one node."""

    node_id: str
    entered: int = 0
    exited: int = 0
    waiting: int = 0
    sent: int = 0
    delivered: int = 0
    opened: int = 0
    clicked: int = 0
    failed: int = 0
    converted: int = 0
    outputs: dict[str, int] = field(default_factory=dict)


@dataclass
class JourneyCounts:
    """Counts of a journey."""

    entered: int = 0
    refused: int = 0
    converted: int = 0
    active: int = 0
    nodes: list[NodeCounts] = field(default_factory=list)

    @property
    def conversion_rate(self) -> float:
        """converted / entered, 0 when nobody entered."""
        return self.converted / self.entered if self.entered else 0.0


async def journey_stats(
    pool: asyncpg.Pool,
    app_id: str,
    journey_id: uuid.UUID,
    start: datetime | None,
    end: datetime | None,
) -> JourneyCounts:
    """The statistics of a journey over ``[start, end)`` (either side open when None)."""
    lo, hi = start or _FAR_PAST, end or _FAR_FUTURE
    async with pool.acquire() as conn:
        row = await journeys_store.get_journey(conn, app_id, journey_id)
        if row is None:
            raise not_found(journey_id)
        versions = await conn.fetch(
            "SELECT definition FROM journey_versions WHERE app_id = $1 AND journey_id = $2"
            " ORDER BY version",
            app_id,
            journey_id,
        )
        entries = await conn.fetch(
            """
            SELECT outcome = 'ENTERED' AS entered, count(*) AS n FROM entries
            WHERE journey_id = $2 AND app_id = $1 AND entry_time >= $3 AND entry_time < $4
            GROUP BY 1
            """,
            app_id,
            journey_id,
            lo,
            hi,
        )
        arrivals = await conn.fetch(
            """
            SELECT node_id, count(*) AS n FROM path_steps
            WHERE journey_id = $2 AND app_id = $1 AND enter_time >= $3 AND enter_time < $4
            GROUP BY node_id
            """,
            app_id,
            journey_id,
            lo,
            hi,
        )
        departures = await conn.fetch(
            """
            SELECT node_id, output, count(*) AS n FROM path_steps
            WHERE journey_id = $2 AND app_id = $1 AND exit_time >= $3 AND exit_time < $4
              AND enter_time < $4
            GROUP BY node_id, output
            """,
            app_id,
            journey_id,
            lo,
            hi,
        )
        waiting = await conn.fetch(
            """
            SELECT node_id, count(*) AS n FROM instances
            WHERE journey_id = $2 AND app_id = $1 AND status IN ('active', 'waiting')
            GROUP BY node_id
            """,
            app_id,
            journey_id,
        )
        receipts = await conn.fetch(
            """
            SELECT node_id, status, count(DISTINCT idempotency_key) AS n FROM send_receipts
            WHERE journey_id = $2 AND app_id = $1 AND occurred_at >= $3 AND occurred_at < $4
            GROUP BY node_id, status
            """,
            app_id,
            journey_id,
            lo,
            hi,
        )
    order: dict[str, NodeCounts] = {}
    send_nodes: set[str] = set()
    # Nodes of every version, latest last, so a node kept across versions appears once.
    for version in versions:
        for graph_node in jpb.JourneyDefinition.FromString(bytes(version["definition"])).nodes:
            order.setdefault(graph_node.node_id, NodeCounts(graph_node.node_id))
            if node_kind(graph_node) == "send":
                send_nodes.add(graph_node.node_id)

    def at(node_id: str) -> NodeCounts:
        return order.setdefault(node_id, NodeCounts(node_id))

    counts = JourneyCounts()
    for r in entries:
        if r["entered"]:
            counts.entered = int(r["n"])
        else:
            counts.refused = int(r["n"])
    for r in arrivals:
        n = at(r["node_id"])
        n.entered = int(r["n"])
        if r["node_id"] in send_nodes:
            n.sent = n.entered
    for r in departures:
        n = at(r["node_id"])
        n.exited += int(r["n"])
        output = str(r["output"])
        if output == "(goal)":
            n.converted += int(r["n"])
            counts.converted += int(r["n"])
        elif output and not output.startswith("("):
            n.outputs[output] = n.outputs.get(output, 0) + int(r["n"])
    for r in waiting:
        at(r["node_id"]).waiting = int(r["n"])
        counts.active += int(r["n"])
    for r in receipts:
        n = at(r["node_id"])
        status = str(r["status"])
        if status in ("failed", "bounced"):
            n.failed += int(r["n"])
        elif status in ("delivered", "opened", "clicked"):
            setattr(n, status, getattr(n, status) + int(r["n"]))
    counts.nodes = list(order.values())
    return counts
