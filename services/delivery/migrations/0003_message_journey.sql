-- The journey and node that sent a message (journey records on delivery.requests carry them),
-- so every later receipt of the message (opened, clicked, delivered, bounced...) names them too.
ALTER TABLE messages
    ADD COLUMN journey_id      text NOT NULL DEFAULT '',
    ADD COLUMN journey_node_id text NOT NULL DEFAULT '';
