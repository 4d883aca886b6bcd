-- Which worker claimed a 'sending' row: the key of a session advisory lock that worker holds
-- while it lives. The scheduler settles a stuck send only once that lock is gone (the worker
-- died), never while its worker is merely slow or paused with the call's answer on its way.
ALTER TABLE messages ADD COLUMN claimed_by bigint;

-- A retried or deferred message put back on delivery.requests keeps its record (request) while
-- queued, so that the scheduler can publish it again if that record never leads to a claim
-- (lost between the outbox and a worker): the queued rows it looks at, oldest first.
CREATE INDEX messages_requeued ON messages (update_time)
    WHERE state = 'queued' AND request IS NOT NULL;
