-- Runtime tables every service database carries (services/runtime/outbox.py, inbox.py).

-- Transactional outbox: a service writes its facts here in the same transaction as the change
-- they describe; the relay publishes rows to Kafka and deletes them. Rows are only ever
-- published and deleted, never marked: the relay keeps no cursor over ids, because ids are
-- assigned at insert time but become visible at commit time, out of order.
CREATE TABLE outbox (
    id            bigserial   PRIMARY KEY,
    topic         text        NOT NULL,
    -- Kafka record key (the user id): Kafka keeps one key's records in order.
    key           text        NOT NULL,
    -- Full protobuf name of the payload (e.g. tidings.events.v1.IdentityChange).
    event_type    text        NOT NULL,
    payload       bytea       NOT NULL,
    -- Kafka headers as two parallel arrays (header values are bytes).
    header_keys   text[]      NOT NULL DEFAULT '{}',
    header_values bytea[]     NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT outbox_headers_paired CHECK (
        cardinality(header_keys) = cardinality(header_values)
    )
);

-- Identifies this database (its lineage, not its name) to the relay: relays of all replicas of
-- one database share a Kafka transactional id and progress markers derived from it, and a fresh
-- database of the same service never acts on markers written for another one.
CREATE TABLE outbox_instance (
    id        uuid    NOT NULL DEFAULT gen_random_uuid(),
    singleton boolean NOT NULL DEFAULT true PRIMARY KEY CHECK (singleton)
);
INSERT INTO outbox_instance DEFAULT VALUES;

-- Wake the relay at commit (NOTIFY is delivered on commit and folded per transaction), so the
-- latency from commit to Kafka is a round trip, not a poll interval. Once per statement: a
-- batch insert costs one notification.
CREATE FUNCTION outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tidings_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify
    AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- Inbox: the events a consumer already applied, claimed in the same transaction as the effect,
-- so a redelivered Kafka record has no second effect.
CREATE TABLE inbox (
    consumer     text        NOT NULL,
    event_id     text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- For pruning old entries; BRIN because processed_at follows insertion order and a B-tree
-- would cost every claim another index write.
CREATE INDEX inbox_processed_at_brin ON inbox USING brin (processed_at);
