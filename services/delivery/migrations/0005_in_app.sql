-- In-app messages have no provider: the worker claims the ledger row as for any send, stores the
-- rendered tidings.delivery.v1.InAppContent, and the SDK of the subscription fetches it.
ALTER TABLE messages ADD COLUMN content bytea;
CREATE INDEX messages_in_app ON messages (app_id, subscription_id, create_time)
    WHERE channel = 'in_app' AND state = 'sent';
