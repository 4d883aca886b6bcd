"""Our partitioner puts every key where Kafka's default partitioner does.

Consumers rely on it: a user's records from our outbox relays, from ``Producer.send_many`` and
from any other client (a customer's own service producing ``identity.events``) must share one
partition, or their order is lost. aiokafka's pure-Python murmur2 is the reference.
"""

from __future__ import annotations

import random
import uuid

from aiokafka.partitioner import DefaultPartitioner

from services.runtime.kafka import KeyPartitioner, key_partition


def _keys() -> list[bytes]:
    rng = random.Random(20261124)
    keys = [str(uuid.UUID(int=rng.getrandbits(128))).encode() for _ in range(3_000)]
    # Every length up to 64 (murmur2 handles the 0-3 trailing bytes separately), and bytes
    # with the high bit set (signed arithmetic in the Java original).
    keys += [rng.randbytes(n) for n in range(65) for _ in range(30)]
    keys += [b"", b"\xff" * 7, "usuário-ñ".encode()]
    return keys


def test_every_key_lands_where_kafkas_default_partitioner_puts_it() -> None:
    reference = DefaultPartitioner()
    for count in (1, 3, 12, 50):
        partitions = list(range(count))
        for key in _keys():
            assert key_partition(key, partitions) == reference(key, partitions, partitions), (
                key,
                count,
            )


def test_partition_ids_are_taken_from_the_list_given() -> None:
    # The index is into the sorted list of ids, as the Java client does.
    ids = [4, 9, 17]
    reference = DefaultPartitioner()
    for key in _keys()[:500]:
        assert key_partition(key, ids) == reference(key, ids, ids)


def test_records_without_a_key_go_to_an_available_partition() -> None:
    partitioner = KeyPartitioner()
    chosen = {partitioner(None, [0, 1, 2, 3], [1, 3]) for _ in range(200)}
    assert chosen == {1, 3}
    assert {partitioner(None, [0, 1], []) for _ in range(200)} == {0, 1}
    assert partitioner(b"user-1", [0, 1, 2], [0]) == key_partition(b"user-1", [0, 1, 2])
