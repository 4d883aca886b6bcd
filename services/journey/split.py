"""Random split: a weighted choice that is the same every time for one (journey, split node,
customer).

The customer's position is a hash of the journey id, the split node's id and the user id
(SHA-256, first 8 bytes, as a fraction of 2^64) so replicas, restarts and re-entries all pick the
same branch, the shares converge to weight / sum of weights over many customers, and two splits
of one journey choose independently (a 50/50 split after a 50/50 split makes four quarters).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence

from tidings.journey.v1 import journey_pb2 as jpb

__all__ = ["choose_branch", "position"]


def position(journey_id: uuid.UUID, node_id: str, user_id: uuid.UUID) -> float:
    """The customer's point in [0, 1) at this split node of this journey."""
    digest = hashlib.sha256(journey_id.bytes + user_id.bytes + node_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose_branch(
    journey_id: uuid.UUID, node_id: str, user_id: uuid.UUID, branches: Sequence[jpb.SplitBranch]
) -> str:
    """The output of ``branches`` (the split node ``node_id``'s) this customer takes."""
    total = sum(max(b.weight, 0) for b in branches)
    if total <= 0:
        return branches[0].output if branches else ""
    point = position(journey_id, node_id, user_id) * total
    for branch in branches:
        point -= max(branch.weight, 0)
        if point < 0:
            return branch.output
    return branches[-1].output
