-- Segments: saved audiences (a condition, or a fixed list from an import), their materialised
-- members, the history of past memberships, and the queue of users whose membership may have
-- changed (services/identity/segment*.py, docs/segments.md).

CREATE TABLE segments (
    app_id           text        NOT NULL,
    segment_id       uuid        NOT NULL,
    display_name     text        NOT NULL,
    description      text        NOT NULL DEFAULT '',
    kind             text        NOT NULL CHECK (kind IN ('dynamic', 'list')),
    -- DYNAMIC: the condition tree (services/identity/segment_conditions.py), with the type of
    -- every custom attribute it names resolved when it was saved (types never change).
    condition        jsonb,
    -- Segments the condition names (member_of): refused deletes and dependency order.
    refers_to        uuid[]      NOT NULL DEFAULT '{}',
    -- Whether membership changes as time passes ("in the last 7 days", birthdays): such
    -- segments are re-checked on a schedule.
    time_relative    boolean     NOT NULL DEFAULT false,
    -- LIST from an import: the import job's id.
    import_id        text,
    -- Rows in segment_members, kept in step by whoever changes them.
    member_count     bigint      NOT NULL DEFAULT 0,
    -- When membership was last computed in full; NULL while a first (or a re-) materialisation
    -- is pending (a crash between saving and materialising leaves it NULL; the maintainer's
    -- sweep finishes the job).
    materialise_time timestamptz,
    -- When the schedule last re-checked a time-relative segment.
    refresh_time     timestamptz,
    create_time      timestamptz NOT NULL DEFAULT now(),
    update_time      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, segment_id),
    -- ListSegments pages by name.
    UNIQUE (app_id, display_name),
    CHECK ((kind = 'dynamic') = (condition IS NOT NULL))
);
-- "Which segments refer to this one" (DeleteSegment, dependents of a re-materialised segment).
CREATE INDEX segments_refers_to ON segments USING gin (refers_to);

-- Current members. No foreign keys: a materialisation inserts up to millions of rows, and a
-- per-row RI check (with its row lock on users) would cost more than the insert itself. Rows
-- of an erased user are purged by the maintainer (the erasure marks the user dirty in its
-- transaction), rows of a deleted segment by DeleteSegment. Only the primary key: one user's
-- memberships are found segment by segment (an app has few segments), so a second index per
-- member, paid on every materialisation, would buy nothing.
CREATE TABLE segment_members (
    app_id     text        NOT NULL,
    segment_id uuid        NOT NULL,
    user_id    uuid        NOT NULL,
    -- Start of the current membership period (the open period of the history).
    enter_time timestamptz NOT NULL,
    PRIMARY KEY (app_id, segment_id, user_id)
);

-- Closed membership periods. The open period of a current member is its segment_members row,
-- so an entry writes one row and an exit moves it here.
CREATE TABLE segment_membership_history (
    app_id     text        NOT NULL,
    segment_id uuid        NOT NULL,
    user_id    uuid        NOT NULL,
    enter_time timestamptz NOT NULL,
    exit_time  timestamptz NOT NULL,
    PRIMARY KEY (app_id, user_id, segment_id, enter_time)
);
CREATE INDEX segment_membership_history_segment ON segment_membership_history (app_id, segment_id);

-- Users whose membership may have changed, written in the transaction of the change (a profile,
-- subscription or merge fact, stored events). Append-only, so marking never waits on a lock:
-- the maintainer claims rows oldest first (FOR UPDATE SKIP LOCKED), re-evaluates their users
-- and deletes the rows in the transaction that applies the result.
CREATE TABLE segment_dirty_users (
    id        bigserial   PRIMARY KEY,
    app_id    text        NOT NULL,
    user_id   uuid        NOT NULL,
    mark_time timestamptz NOT NULL DEFAULT now()
);

-- Wake the maintainer at commit, like the outbox relay (once per statement).
CREATE FUNCTION segment_dirty_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tidings_segments', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER segment_dirty_notify
    AFTER INSERT ON segment_dirty_users
    FOR EACH STATEMENT EXECUTE FUNCTION segment_dirty_notify();

-- A timestamp custom attribute as stored (RFC 3339 text with its offset, see
-- users_store.format_timestamp) read back as a timestamptz. The text carries its offset, so the
-- result does not depend on the session's time zone: declared IMMUTABLE so an expression index
-- can use it (docs/segments.md, "Indexes").
CREATE FUNCTION segment_timestamp(value text) RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT value::timestamptz
$$;

-- A string property of an event read as a timestamp, or NULL when it is not one (event
-- properties are untyped: a bad value must not fail a whole count).
CREATE FUNCTION segment_try_timestamp(value text) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
BEGIN
    IF value !~ '^\d{4}-\d{2}-\d{2}' THEN
        RETURN NULL;
    END IF;
    RETURN value::timestamptz;
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$$;

-- A protobuf length-delimited field (string) with its tag, for the change facts that segment
-- statements write to the outbox in bulk; '' for a NULL or empty value (proto3 omits them).
-- Lengths up to 16,383 bytes (a two-byte varint): ids and external ids are far shorter.
CREATE FUNCTION segment_pb_string(tag bytea, value text) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN value IS NULL OR value = '' THEN '\x'::bytea
        WHEN octet_length(convert_to(value, 'UTF8')) < 128 THEN
            tag || set_byte('\x00'::bytea, 0, octet_length(convert_to(value, 'UTF8')))
                || convert_to(value, 'UTF8')
        ELSE
            tag || set_byte(set_byte('\x0000'::bytea,
                                     0, (octet_length(convert_to(value, 'UTF8')) & 127) | 128),
                            1, octet_length(convert_to(value, 'UTF8')) >> 7)
                || convert_to(value, 'UTF8')
    END
$$;

-- Subscription conditions: who holds a reachable subscription of a type.
CREATE INDEX subscriptions_reachable ON subscriptions (app_id, type, user_id)
    WHERE enabled AND opt_in = 'subscribed';
