-- The suppression list: addresses and tokens whose owner opted out and whose subscription is
-- gone (deleted, erased, evicted, dropped by a merge). An import that creates one of them again
-- creates it unsubscribed. Kept as a keyed hash (HMAC-SHA256 of app, type and token under a key
-- derived from TIDINGS_IDENTITY_SECRET_KEY, services/identity/suppressions.py), never in clear:
-- an erased person's address is not kept, and a dump cannot be reversed by hashing guesses
-- without the key. A row lives while no subscription has that (type, token): creating one
-- consumes it.
CREATE TABLE suppressions (
    app_id      text        NOT NULL REFERENCES apps (app_id) ON DELETE CASCADE,
    type        text        NOT NULL,
    token_hash  bytea       NOT NULL,
    create_time timestamptz NOT NULL,
    PRIMARY KEY (app_id, type, token_hash)
);
