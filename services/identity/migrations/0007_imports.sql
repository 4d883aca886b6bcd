-- CSV imports (services/identity/imports.py): one row per job, and every row it refused.

CREATE TABLE import_jobs (
    app_id         text        NOT NULL,
    import_id      text        NOT NULL,
    -- ImportOptions as its JSON mapping (protobuf JSON), as the client sent them.
    options        jsonb       NOT NULL,
    state          text        NOT NULL
                       CHECK (state IN ('receiving', 'applying', 'succeeded', 'failed')),
    -- The session advisory lock the process running the job holds while it runs: a job still
    -- receiving or applying whose lock is free has lost its process (killed, or its database
    -- connection died) and is marked failed (imports.recover_orphaned_jobs).
    lock_key       bigint      NOT NULL,
    bytes_received bigint      NOT NULL DEFAULT 0,
    rows           bigint      NOT NULL DEFAULT 0,
    created        bigint      NOT NULL DEFAULT 0,
    updated        bigint      NOT NULL DEFAULT 0,
    unchanged      bigint      NOT NULL DEFAULT 0,
    rejected       bigint      NOT NULL DEFAULT 0,
    flagged_cells  bigint      NOT NULL DEFAULT 0,
    error          text        NOT NULL DEFAULT '',
    segment_id     text        NOT NULL DEFAULT '',
    create_time    timestamptz NOT NULL DEFAULT now(),
    finish_time    timestamptz,
    PRIMARY KEY (app_id, import_id)
);
-- ListImportJobs pages newest first.
CREATE INDEX import_jobs_page ON import_jobs (app_id, create_time DESC, import_id DESC);
-- The orphan check looks only at running jobs.
CREATE INDEX import_jobs_running ON import_jobs (lock_key) WHERE state IN ('receiving', 'applying');

-- One row per refused line (a row is refused for its first problem).
CREATE TABLE import_rejections (
    app_id      text   NOT NULL,
    import_id   text   NOT NULL,
    line        bigint NOT NULL,
    column_name text   NOT NULL,
    reason      text   NOT NULL,
    message     text   NOT NULL,
    PRIMARY KEY (app_id, import_id, line),
    FOREIGN KEY (app_id, import_id) REFERENCES import_jobs (app_id, import_id) ON DELETE CASCADE
);

-- Protocol Buffers wire format, so an import writes its change facts to the outbox with one
-- INSERT ... SELECT per kind instead of encoding a million messages in Python. Only what those
-- facts need: varints below 2^21 (tags, string lengths) and length-delimited strings.
-- Both are plain expressions the planner inlines (so neither is STRICT: a STRICT function
-- whose body is a CASE is never inlined, and a call through the SQL function executor costs
-- microseconds, a million times). Bit operators share one precedence in SQL: parenthesise.
CREATE FUNCTION pb_varint(n integer) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN n < 128 THEN substring(int4send(n) FROM 4)
        WHEN n < 16384 THEN substring(int4send((((n & 127) | 128) << 8) | (n >> 7)) FROM 3)
        ELSE substring(int4send((((n & 127) | 128) << 16) | ((((n >> 7) & 127) | 128) << 8)
                                | (n >> 14)) FROM 2)
    END
$$;

-- A string field (`field` is its number); the empty string, proto3's default, is left out.
-- STABLE like convert_to (an IMMUTABLE function calling a STABLE one is not inlined). Pass a
-- plain column as `value`: an expression used three times is not inlined either.
CREATE FUNCTION pb_string(field integer, value text) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN value IS NULL OR value = '' THEN '\x'::bytea
        ELSE pb_varint((field << 3) | 2) || pb_varint(octet_length(value))
             || convert_to(value, 'UTF8')
    END
$$;
