-- CreateSubscription's idempotency keys (AIP-155): a retry with the same request_id within 24
-- hours answers with the subscription the first call registered, so an SDK whose registration
-- timed out after the commit can still learn its subscription id.
CREATE TABLE subscription_requests (
    app_id          text        NOT NULL,
    request_id      uuid        NOT NULL,
    subscription_id uuid        NOT NULL,
    -- A hash of what was asked (type, token, user): the same request_id for another
    -- registration is refused rather than answered with this subscription.
    fingerprint     text        NOT NULL,
    create_time     timestamptz NOT NULL,
    PRIMARY KEY (app_id, request_id),
    -- A deleted subscription takes its keys along (a replay then registers afresh).
    FOREIGN KEY (app_id, subscription_id) REFERENCES subscriptions (app_id, subscription_id)
        ON DELETE CASCADE
);
CREATE INDEX subscription_requests_subscription
    ON subscription_requests (app_id, subscription_id);
-- Expired keys are purged a few at a time by the writes that add new ones.
CREATE INDEX subscription_requests_expiry ON subscription_requests (create_time);
