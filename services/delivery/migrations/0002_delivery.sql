-- Delivery's tables: per-app settings, templates with versions, channel configurations (with
-- encrypted credentials), Send idempotency, messages (the send ledger) with their timelines,
-- broadcasts, and the per-app service keys delivery uses to call identity.

-- An app this deployment knows: created by its first settings, template, channel or send.
-- Workers skip fan-out records of apps not listed here (another deployment's, on a shared
-- broker).
CREATE TABLE app_settings (
    app_id             text        PRIMARY KEY,
    cap_max            integer     NOT NULL DEFAULT 0,
    cap_window_seconds integer     NOT NULL DEFAULT 0,
    cap_action         text        NOT NULL DEFAULT 'drop' CHECK (cap_action IN ('drop', 'defer')),
    quiet_enabled      boolean     NOT NULL DEFAULT false,
    -- Minutes after local midnight.
    quiet_start        integer     NOT NULL DEFAULT 0,
    quiet_end          integer     NOT NULL DEFAULT 0,
    default_timezone   text        NOT NULL DEFAULT '',
    create_time        timestamptz NOT NULL DEFAULT now(),
    update_time        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE templates (
    app_id         text        NOT NULL,
    template_id    uuid        NOT NULL,
    display_name   text        NOT NULL,
    channel        text        NOT NULL,
    latest_version integer     NOT NULL,
    create_time    timestamptz NOT NULL,
    update_time    timestamptz NOT NULL,
    PRIMARY KEY (app_id, template_id),
    UNIQUE (app_id, display_name)
);

-- Every version is kept: sends may pin one, and a message rendered later uses the version it
-- was sent with. `body` is the serialised tidings.delivery.v1.Template of that version.
CREATE TABLE template_versions (
    app_id      text        NOT NULL,
    template_id uuid        NOT NULL,
    version     integer     NOT NULL,
    body        bytea       NOT NULL,
    create_time timestamptz NOT NULL,
    PRIMARY KEY (app_id, template_id, version),
    FOREIGN KEY (app_id, template_id) REFERENCES templates ON DELETE CASCADE
);

-- Credentials are AES-256-GCM ciphertext (nonce || ciphertext+tag) of their JSON, with the
-- app and channel as associated data, so a row copied to another app does not decrypt.
CREATE TABLE channel_configs (
    app_id            text             NOT NULL,
    channel           text             NOT NULL,
    provider          text             NOT NULL,
    credentials       bytea            NOT NULL,
    credential_fields text[]           NOT NULL,
    disabled          boolean          NOT NULL DEFAULT false,
    rate_limit        double precision NOT NULL DEFAULT 0,
    create_time       timestamptz      NOT NULL,
    update_time       timestamptz      NOT NULL,
    PRIMARY KEY (app_id, channel)
);

-- Send's idempotency: the first answer under a key, replayed for 30 days.
CREATE TABLE send_calls (
    app_id          text        NOT NULL,
    idempotency_key text        NOT NULL,
    request_hash    bytea       NOT NULL,
    response        bytea       NOT NULL,
    create_time     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, idempotency_key)
);
CREATE INDEX send_calls_create_time ON send_calls USING brin (create_time);

-- One row per message: the send ledger. Unique by idempotency key, and written (state
-- 'sending') before the provider call, so no key ever gets a second call for the same
-- dispatch. States: queued -> sending -> sent | failed | retry_wait; queued -> deferred; a
-- deferred or retry_wait row is put back on delivery.requests by the scheduler with
-- dispatch + 1 (state queued again).
CREATE TABLE messages (
    app_id              text        NOT NULL,
    message_id          uuid        NOT NULL,
    idempotency_key     text        NOT NULL,
    user_id             text        NOT NULL DEFAULT '',
    broadcast_id        uuid,
    state               text        NOT NULL CHECK (
        state IN ('queued', 'deferred', 'sending', 'retry_wait', 'sent', 'failed')
    ),
    -- The latest tidings.delivery.v1.MessageStatus (engagement included).
    status              smallint    NOT NULL,
    dispatch            integer     NOT NULL DEFAULT 0,
    attempts            integer     NOT NULL DEFAULT 0,
    channel             text        NOT NULL DEFAULT '',
    subscription_id     text        NOT NULL DEFAULT '',
    template_id         text        NOT NULL DEFAULT '',
    template_version    integer     NOT NULL DEFAULT 0,
    provider_message_id text        NOT NULL DEFAULT '',
    -- deferred / retry_wait: when the scheduler puts it back on the topic.
    due_at              timestamptz,
    -- The serialised tidings.events.v1.SendRequest to put back (deferred / retry_wait only).
    request             bytea,
    expire_at           timestamptz,
    -- When the provider call was claimed; counts against frequency caps.
    sent_at             timestamptz,
    create_time         timestamptz NOT NULL DEFAULT now(),
    update_time         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, message_id)
);
CREATE UNIQUE INDEX messages_idempotency ON messages (app_id, idempotency_key);
CREATE INDEX messages_by_user ON messages (app_id, user_id, create_time DESC, message_id);
CREATE INDEX messages_cap ON messages (app_id, user_id, channel, sent_at) WHERE sent_at IS NOT NULL;
CREATE INDEX messages_due ON messages (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX messages_sending ON messages (update_time) WHERE state = 'sending';

-- The status timeline of each message.
CREATE TABLE message_events (
    app_id     text        NOT NULL,
    message_id uuid        NOT NULL,
    id         bigserial   NOT NULL,
    status     smallint    NOT NULL,
    reason     text        NOT NULL DEFAULT '',
    detail     text        NOT NULL DEFAULT '',
    time       timestamptz NOT NULL,
    PRIMARY KEY (app_id, message_id, id)
);

CREATE TABLE broadcasts (
    app_id        text        NOT NULL,
    broadcast_id  uuid        NOT NULL,
    request_id    text        NOT NULL DEFAULT '',
    display_name  text        NOT NULL DEFAULT '',
    -- Serialised tidings.delivery.v1.Audience and MessageSpec.
    audience      bytea       NOT NULL,
    spec          bytea       NOT NULL,
    state         text        NOT NULL CHECK (
        state IN ('fanning_out', 'enqueued', 'failed', 'cancelled')
    ),
    -- Where the fan-out resumes after a crash (an identity page token, an index).
    cursor        text        NOT NULL DEFAULT '',
    enqueued      bigint      NOT NULL DEFAULT 0,
    sent          bigint      NOT NULL DEFAULT 0,
    failed        bigint      NOT NULL DEFAULT 0,
    deferred      bigint      NOT NULL DEFAULT 0,
    error         text        NOT NULL DEFAULT '',
    create_time   timestamptz NOT NULL DEFAULT now(),
    update_time   timestamptz NOT NULL DEFAULT now(),
    enqueued_time timestamptz,
    PRIMARY KEY (app_id, broadcast_id)
);
CREATE UNIQUE INDEX broadcasts_request_id ON broadcasts (app_id, request_id) WHERE request_id <> '';
CREATE INDEX broadcasts_by_time ON broadcasts (app_id, create_time DESC, broadcast_id);
CREATE INDEX broadcasts_running ON broadcasts (create_time) WHERE state = 'fanning_out';

-- The server key delivery holds per app to call identity (BatchGetUsers, ListUsers, segment
-- members, opt-outs), minted with the admin key through AppsService.CreateApiKey; encrypted
-- like credentials.
CREATE TABLE identity_keys (
    app_id      text        PRIMARY KEY,
    key_id      text        NOT NULL,
    secret      bytea       NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now()
);
