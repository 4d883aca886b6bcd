-- The per-app server keys journey calls identity and delivery with, as delivery holds them
-- (services/runtime/service_keys.py): minted with the admin key, sealed with
-- TIDINGS_JOURNEY_SECRET_KEY (AES-256-GCM, bound to the app). They replace app_credentials,
-- which kept the last caller's key in plain text: dropped with its secrets.
CREATE TABLE identity_keys (
    app_id      text        PRIMARY KEY,
    key_id      text        NOT NULL,
    secret      bytea       NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now()
);

DROP TABLE app_credentials;
