"""The segment store against a real, migrated database: the import-list contract, the dirty
queue, and the facts the membership statements write to the outbox (decoded as consumers do).

The behaviour through gRPC and Kafka is in ``test_segments*.py``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from tidings.events.v1.identity_change_pb2 import IdentityChange

from services.identity import segment_maintainer, segments_store
from services.identity.segment_conditions import (
    AllOf,
    AnyOf,
    AttributeCondition,
    Condition,
    CountOperator,
    EventCondition,
    MembershipCondition,
    NotOf,
    Operator,
    PropertyCondition,
    SubscriptionCondition,
    from_json,
    is_time_relative,
    referenced_segments,
    to_json,
)
from services.identity.server import MIGRATIONS_DIR
from services.runtime.db import create_pool
from services.runtime.errors import AlreadyExists, InvalidArgument
from services.runtime.kafka import IDENTITY_CHANGES
from services.runtime.migrations import migrate, sources_for

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)


@pytest.fixture
async def pool(scratch_db: str) -> AsyncIterator[asyncpg.Pool]:
    await migrate(scratch_db, sources_for("identity", MIGRATIONS_DIR))
    pool = await create_pool(scratch_db, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


async def add_users(
    pool: asyncpg.Pool, app_id: str, external_ids: list[str | None]
) -> list[uuid.UUID]:
    await pool.execute(
        "INSERT INTO apps (app_id, display_name) VALUES ($1, $1) ON CONFLICT DO NOTHING", app_id
    )
    users = [uuid.uuid4() for _ in external_ids]
    await pool.execute(
        "INSERT INTO users (app_id, user_id, external_id) "
        "SELECT $1, unnest($2::uuid[]), unnest($3::text[])",
        app_id,
        users,
        external_ids,
    )
    return users


async def outbox_facts(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
) -> list[IdentityChange]:
    rows = await conn.fetch("SELECT topic, key, event_type, payload FROM outbox ORDER BY id")
    facts = []
    for row in rows:
        assert row["topic"] == IDENTITY_CHANGES.name
        assert row["event_type"] == IDENTITY_CHANGES.event_type
        fact = IDENTITY_CHANGES.decode(row["payload"])
        assert row["key"] == fact.user_id
        facts.append(fact)
    return facts


async def create_list(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
    app_id: str,
    members: list[uuid.UUID],
    name: str = "VIP import",
) -> str:
    await conn.execute('CREATE TEMPORARY TABLE "import members" (user_id uuid) ON COMMIT DROP')
    await conn.execute(
        'INSERT INTO "import members" SELECT unnest($1::uuid[])', members + members[:1]
    )
    return await segments_store.create_list_segment(
        conn,
        app_id,
        display_name=name,
        import_id="imp-1",
        members_table="import members",
        at=NOW,
    )


async def test_create_list_segment_inserts_members_and_publishes_entered_facts(
    pool: asyncpg.Pool,
) -> None:
    long_external_id = "é" * 150  # 300 bytes: a two-byte length prefix
    users = await add_users(pool, "app-a", ["crm-1", None, long_external_id])
    (stranger,) = await add_users(pool, "app-b", ["crm-9"])
    async with pool.acquire() as conn, conn.transaction():
        segment_id = await create_list(conn, "app-a", [*users, stranger, uuid.uuid4()])
    async with pool.acquire() as conn:
        segment = await segments_store.get_segment(conn, "app-a", uuid.UUID(segment_id))
    assert segment is not None
    assert (segment.kind, segment.import_id, segment.member_count) == ("list", "imp-1", 3)
    assert segment.display_name == "VIP import"
    members = await pool.fetch(
        "SELECT user_id, enter_time FROM segment_members WHERE app_id = 'app-a' "
        "AND segment_id = $1",
        uuid.UUID(segment_id),
    )
    assert {row["user_id"] for row in members} == set(users)
    assert {row["enter_time"] for row in members} == {NOW}
    async with pool.acquire() as conn:
        facts = await outbox_facts(conn)
    assert sorted(f.user_id for f in facts) == sorted(str(u) for u in users)
    by_user = {f.user_id: f for f in facts}
    for user, external_id in zip(users, ["crm-1", "", long_external_id], strict=True):
        fact = by_user[str(user)]
        assert fact.kind == IdentityChange.KIND_SEGMENT_ENTERED
        assert fact.segment_id == segment_id
        assert fact.app_id == "app-a"
        assert fact.external_id == external_id
        assert fact.occurred_at.ToDatetime(tzinfo=UTC) == NOW
        statement, _, user_part = fact.event_id.partition(".")
        assert uuid.UUID(statement)
        assert user_part == str(user)
    assert len({f.event_id for f in facts}) == 3
    async with pool.acquire() as conn:
        membership = await segments_store.membership_of(
            conn, "app-a", uuid.UUID(segment_id), users[0]
        )
    assert membership.enter_time == NOW


async def test_create_list_segment_refuses_a_taken_name_and_leaves_the_transaction_usable(
    pool: asyncpg.Pool,
) -> None:
    users = await add_users(pool, "app-a", ["crm-1"])
    async with pool.acquire() as conn, conn.transaction():
        await create_list(conn, "app-a", users, name="Same")
    async with pool.acquire() as conn, conn.transaction():
        with pytest.raises(AlreadyExists) as caught:
            await create_list(conn, "app-a", users, name="Same")
        assert caught.value.reason == "SEGMENT_NAME_TAKEN"
        assert [v.field for v in caught.value.field_violations] == ["options.list_name"]
        assert await conn.fetchval("SELECT 1") == 1  # the import's transaction goes on
    # Another app may use the name.
    others = await add_users(pool, "app-b", ["crm-2"])
    async with pool.acquire() as conn, conn.transaction():
        await create_list(conn, "app-b", others, name="Same")


async def test_create_list_segment_refuses_a_bad_name(pool: asyncpg.Pool) -> None:
    users = await add_users(pool, "app-a", ["crm-1"])
    for bad in ("", "  ", "x" * 201, "tab\there"):
        async with pool.acquire() as conn, conn.transaction():
            with pytest.raises(InvalidArgument) as caught:
                await create_list(conn, "app-a", users, name=bad)
            assert [v.field for v in caught.value.field_violations] == ["options.list_name"]


async def test_create_list_segment_rolls_back_with_the_import(pool: asyncpg.Pool) -> None:
    users = await add_users(pool, "app-a", ["crm-1"])
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        await create_list(conn, "app-a", users)
        await transaction.rollback()
    assert await pool.fetchval("SELECT count(*) FROM segments") == 0
    assert await pool.fetchval("SELECT count(*) FROM segment_members") == 0
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0


async def test_mark_dirty_queues_each_user_once_per_call(pool: asyncpg.Pool) -> None:
    users = await add_users(pool, "app-a", ["a", "b"])
    async with pool.acquire() as conn, conn.transaction():
        await segments_store.mark_dirty(
            conn, [("app-a", users[0]), ("app-a", str(users[0])), ("app-a", users[1])]
        )
        await segments_store.mark_dirty(conn, [])
    async with pool.acquire() as conn, conn.transaction():
        claimed = await segments_store.claim_dirty(conn, 10)
    assert sorted(c.user_id for c in claimed) == sorted(users)
    assert await pool.fetchval("SELECT count(*) FROM segment_dirty_users") == 0


# -- the maintainer's unit of work ---------------------------------------------------------------


async def add_segment(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
    app_id: str,
    name: str,
    condition: Condition,
) -> segments_store.SegmentRecord:
    record = await segments_store.insert_segment(
        conn,
        app_id,
        segment_id=uuid.uuid4(),
        display_name=name,
        description="",
        kind="dynamic",
        condition_json=json.dumps(to_json(condition)),
        refers_to=sorted(uuid.UUID(s) for s in referenced_segments(condition)),
        time_relative=is_time_relative(condition),
        import_id=None,
        materialised=True,
        at=NOW,
    )
    assert record is not None
    return record


GOLD = AttributeCondition(
    field="attributes.plan", operator=Operator.EQUALS, values=("gold",), type="string"
)


async def test_a_rolled_back_reevaluation_keeps_its_marks_and_publishes_nothing(
    pool: asyncpg.Pool,
) -> None:
    (ana,) = await add_users(pool, "app-a", ["ana"])
    async with pool.acquire() as conn:
        gold = await add_segment(conn, "app-a", "gold", GOLD)
        refer = await add_segment(
            conn,
            "app-a",
            "gold members",
            MembershipCondition(segment_id=str(gold.segment_id)),
        )
        await conn.execute(
            'UPDATE users SET attributes = \'{"plan": "gold"}\' WHERE user_id = $1', ana
        )
        async with conn.transaction():
            await segments_store.mark_dirty(conn, [("app-a", ana)])
        # A maintainer that dies before committing: nothing happened.
        transaction = conn.transaction()
        await transaction.start()
        claimed = await segments_store.claim_dirty(conn, 10)
        assert [c.user_id for c in claimed] == [ana]
        assert await segment_maintainer.reevaluate(conn, "app-a", [ana], at=NOW) == (2, 0)
        await transaction.rollback()
        assert await conn.fetchval("SELECT count(*) FROM outbox") == 0
        assert await conn.fetchval("SELECT count(*) FROM segment_members") == 0
        # The next one does it once; the segment naming the other follows it in one go.
        async with conn.transaction():
            claimed = await segments_store.claim_dirty(conn, 10)
            assert await segment_maintainer.reevaluate(
                conn, "app-a", [c.user_id for c in claimed], at=NOW
            ) == (2, 0)
        async with conn.transaction():
            assert await segments_store.claim_dirty(conn, 10) == []
        facts = await outbox_facts(conn)
        assert sorted((f.segment_id, f.kind) for f in facts) == sorted(
            [
                (str(gold.segment_id), IdentityChange.KIND_SEGMENT_ENTERED),
                (str(refer.segment_id), IdentityChange.KIND_SEGMENT_ENTERED),
            ]
        )
        counts = await conn.fetch("SELECT member_count FROM segments")
        assert [row["member_count"] for row in counts] == [1, 1]
        # Erased: memberships forgotten, counts follow, no facts.
        await conn.execute("DELETE FROM outbox")
        await conn.execute("DELETE FROM users WHERE user_id = $1", ana)
        async with conn.transaction():
            assert await segment_maintainer.reevaluate(conn, "app-a", [ana], at=NOW) == (0, 0)
        assert await conn.fetchval("SELECT count(*) FROM segment_members") == 0
        assert await conn.fetchval("SELECT count(*) FROM outbox") == 0
        counts = await conn.fetch("SELECT member_count FROM segments")
        assert [row["member_count"] for row in counts] == [0, 0]


def record(segment_id: uuid.UUID, refers_to: list[uuid.UUID]) -> segments_store.SegmentRecord:
    return segments_store.SegmentRecord(
        app_id="a",
        segment_id=segment_id,
        display_name=str(segment_id),
        description="",
        kind="dynamic",
        condition={},
        refers_to=refers_to,
        time_relative=False,
        import_id=None,
        member_count=0,
        materialise_time=NOW,
        refresh_time=NOW,
        create_time=NOW,
        update_time=NOW,
    )


def test_dependency_levels_put_each_segment_after_those_it_names() -> None:
    a, b, c, d, lst = (uuid.UUID(int=i) for i in range(1, 6))
    records = [record(c, [b]), record(b, [a, lst]), record(a, []), record(d, [])]
    levels = segment_maintainer.dependency_levels(records)
    assert [[r.segment_id for r in level] for level in levels] == [[a, d], [b], [c]]
    assert segment_maintainer.dependency_levels([]) == [[]]


def test_conditions_round_trip_through_json_and_know_if_time_matters() -> None:
    condition = AllOf(
        (
            GOLD,
            NotOf(
                EventCondition(
                    name="purchase",
                    where=(PropertyCondition("amount", Operator.GREATER_THAN, (10.0,)),),
                    count=2,
                    count_operator=CountOperator.AT_MOST,
                    between=(NOW, None),
                )
            ),
            AnyOf((SubscriptionCondition("email"), MembershipCondition(str(uuid.UUID(int=3))))),
        )
    )
    assert from_json(json.loads(json.dumps(to_json(condition)))) == condition
    assert not is_time_relative(condition)
    relative = EventCondition(name="login", within_last=timedelta(days=7))
    assert is_time_relative(AllOf((GOLD, relative)))
    assert is_time_relative(
        AttributeCondition("birthdate", Operator.ANNIVERSARY_IN_DAYS, (), 0, "birthdate")
    )
