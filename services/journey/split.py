"""Random split: a weighted choice that is the same every time for one (journey, customer).

The customer's position is a hash of the journey and user ids (SHA-256, first 8 bytes, as a
fraction of 2^64) so replicas, restarts and re-entries all pick the same branch, and the shares
converge to weight / sum of weights over many customers.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence

from tidings.journey.v1 import journey_pb2 as jpb

__all__ = ["choose_branch", "position"]


def position(journey_id: uuid.UUID, user_id: uuid.UUID) -> float:
    """The customer's point in [0, 1) for this journey."""
    digest = hashlib.sha256(journey_id.bytes + user_id.bytes).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose_branch(
    journey_id: uuid.UUID, user_id: uuid.UUID, branches: Sequence[jpb.SplitBranch]
) -> str:
    """The output of ``branches`` this customer takes."""
    total = sum(max(b.weight, 0) for b in branches)
    if total <= 0:
        return branches[0].output if branches else ""
    point = position(journey_id, user_id) * total
    for branch in branches:
        point -= max(branch.weight, 0)
        if point < 0:
            return branch.output
    return branches[-1].output
