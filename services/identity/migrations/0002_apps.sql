-- Apps (tenants) and their API keys. Everything else in this database is keyed by app_id.

CREATE TABLE apps (
    app_id       text        PRIMARY KEY,
    display_name text        NOT NULL,
    -- AppSettings as JSON: {"allow_client_login": bool, "undefined_fields": "auto_define"|"reject",
    -- "default_timezone": "Europe/Madrid"}.
    settings     jsonb       NOT NULL DEFAULT '{}',
    -- AIP-155: a retried CreateApp with the same request_id returns the first app.
    request_id   text        UNIQUE,
    create_time  timestamptz NOT NULL DEFAULT now(),
    update_time  timestamptz NOT NULL DEFAULT now()
);
-- ListApps pages oldest first by (create_time, app_id).
CREATE INDEX apps_create_time ON apps (create_time, app_id);

-- Secrets are random (256 bits), so a plain SHA-256 is as strong as a slow hash here and lets a
-- key be found by an index lookup on every call.
CREATE TABLE api_keys (
    key_id       text        PRIMARY KEY,
    app_id       text        NOT NULL REFERENCES apps (app_id) ON DELETE CASCADE,
    scope        text        NOT NULL CHECK (scope IN ('server', 'client')),
    display_name text        NOT NULL DEFAULT '',
    prefix       text        NOT NULL,
    secret_hash  bytea       NOT NULL UNIQUE,
    create_time  timestamptz NOT NULL DEFAULT now(),
    revoke_time  timestamptz
);
-- ListApiKeys pages newest first by (create_time, key_id) within an app.
CREATE INDEX api_keys_app ON api_keys (app_id, create_time DESC, key_id DESC);
