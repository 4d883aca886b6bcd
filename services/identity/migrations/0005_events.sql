-- Tracked events, stored by identity's consumer of the identity.events topic.
--
-- Partitioned by month of occurred_at, so "count of purchase in the last 30 days per user" reads
-- one or two partitions and old months can be detached or moved to columnar storage. A unique
-- index on a partitioned table must include the partition key, so deduplication by event id
-- uses its own table (event_ids); an event is inserted only if its id was claimed there.

CREATE TABLE events (
    app_id       text        NOT NULL,
    user_id      uuid        NOT NULL,
    event_id     text        NOT NULL,
    name         text        NOT NULL,
    properties   jsonb       NOT NULL DEFAULT '{}',
    occurred_at  timestamptz NOT NULL,
    receive_time timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (occurred_at);

-- Rows outside every monthly partition (far past, or a month not yet created) land here; the
-- consumer creates the partitions it needs before inserting, so this stays small.
CREATE TABLE events_default PARTITION OF events DEFAULT;

-- A user's timeline (ListEvents, export, erasure) and per-user counts by name: `name` is
-- included so "how many `purchase` since T for this user" is an index-only scan.
CREATE INDEX events_user_time ON events (app_id, user_id, occurred_at DESC) INCLUDE (name);
-- Segment conditions: who did `name` in a time window.
CREATE INDEX events_name_time ON events (app_id, name, occurred_at) INCLUDE (user_id);

-- Deduplication: one row per event id ever stored. Claiming the id here and inserting the event
-- happen in one statement, so an event is stored once however often it is delivered. Only the
-- key is indexed (every index is paid on the hot insert path); an erasure finds a user's ids
-- through the events it deletes. occurred_at tells which partition holds the event, and lets
-- ids of events older than the retention be pruned.
CREATE TABLE event_ids (
    app_id      text        NOT NULL,
    event_id    text        NOT NULL,
    occurred_at timestamptz NOT NULL,
    PRIMARY KEY (app_id, event_id)
);
