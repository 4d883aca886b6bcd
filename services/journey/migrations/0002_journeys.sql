-- Journeys, their versioned definitions, and the engine's durable state: one row per customer
-- per journey, the path each visit took, entries, receipts of the sends, audience jobs and
-- birthday entry timers. Hot tables carry (app_id, journey_id, user_id) in their keys.

-- The server key of each app the engine calls identity and delivery with: the key of the last
-- JourneyService call of the app (least privilege: one app, server scope, revocable by the app).
CREATE TABLE app_credentials (
    app_id      text        PRIMARY KEY,
    key_id      text        NOT NULL,
    secret      text        NOT NULL,
    update_time timestamptz NOT NULL
);

CREATE TABLE journeys (
    app_id         text        NOT NULL,
    journey_id     uuid        NOT NULL,
    display_name   text        NOT NULL,
    description    text        NOT NULL DEFAULT '',
    state          text        NOT NULL CHECK (state IN ('draft', 'active', 'paused', 'stopped')),
    -- The newest version (the one Get and Update see) and the one new entries go to.
    latest_version integer     NOT NULL,
    active_version integer     NOT NULL DEFAULT 0,
    create_time    timestamptz NOT NULL,
    update_time    timestamptz NOT NULL,
    PRIMARY KEY (app_id, journey_id)
);
CREATE INDEX journeys_page ON journeys (app_id, create_time DESC, journey_id DESC);
-- The engine's cache of live journeys reads these.
CREATE INDEX journeys_live ON journeys (state) WHERE state IN ('active', 'paused');

-- Definitions are immutable once written: a serialized tidings.journey.v1.JourneyDefinition.
CREATE TABLE journey_versions (
    app_id        text        NOT NULL,
    journey_id    uuid        NOT NULL,
    version       integer     NOT NULL,
    definition    bytea       NOT NULL,
    create_time   timestamptz NOT NULL,
    activate_time timestamptz,
    PRIMARY KEY (app_id, journey_id, version),
    FOREIGN KEY (app_id, journey_id) REFERENCES journeys (app_id, journey_id) ON DELETE CASCADE
);

-- One customer in one journey: the current (or last) visit.
CREATE TABLE instances (
    app_id             text        NOT NULL,
    journey_id         uuid        NOT NULL,
    user_id            uuid        NOT NULL,
    -- 1 for the first entry, +1 per re-entry; part of every idempotency key.
    visit              integer     NOT NULL,
    version            integer     NOT NULL,
    node_id            text        NOT NULL,
    -- active: the current node runs when wake_at is due; waiting: for wake_at (a timer or a
    -- wait's timeout) or for what waiting_for names; exited / converted: done.
    status             text        NOT NULL
        CHECK (status IN ('active', 'waiting', 'exited', 'converted')),
    waiting_for        text        NOT NULL DEFAULT '',
    -- When the engine must step the customer; NULL when done, or parked while paused.
    wake_at            timestamptz,
    -- While the journey is paused: the wake_at to restore on Resume.
    parked_wake_at     timestamptz,
    -- The output an event or receipt chose for a waiting customer, taken at the next step.
    pending_output     text        NOT NULL DEFAULT '',
    -- Sequence number of the current path step of this visit.
    seq                integer     NOT NULL,
    enter_time         timestamptz NOT NULL,
    node_enter_time    timestamptz NOT NULL,
    exit_time          timestamptz,
    trigger_id         text        NOT NULL,
    trigger_properties jsonb       NOT NULL DEFAULT '{}',
    -- False once DeleteCustomerState took the customer out: re-entry rules ignore that visit.
    counts_for_reentry boolean     NOT NULL DEFAULT true,
    PRIMARY KEY (app_id, journey_id, user_id)
) WITH (fillfactor = 80);
-- What is due now (timers, timeouts, customers ready to move).
CREATE INDEX instances_due ON instances (wake_at) WHERE wake_at IS NOT NULL;
-- Who waits for this event of this user (and whom a goal converts).
CREATE INDEX instances_user ON instances (app_id, user_id) WHERE status IN ('active', 'waiting');
-- Parked customers of a paused journey.
CREATE INDEX instances_parked ON instances (journey_id) WHERE parked_wake_at IS NOT NULL;

-- The path of every visit: one row per node arrival, closed with the output taken. The facts
-- the statistics count (arrivals, departures per output, sends, conversions).
CREATE TABLE path_steps (
    app_id     text        NOT NULL,
    journey_id uuid        NOT NULL,
    user_id    uuid        NOT NULL,
    visit      integer     NOT NULL,
    seq        integer     NOT NULL,
    node_id    text        NOT NULL,
    -- The output taken; '(goal)', '(stopped)', '(removed)', '(moved)' when the engine did not
    -- choose it; '' while the customer is still there.
    output     text        NOT NULL DEFAULT '',
    enter_time timestamptz NOT NULL,
    exit_time  timestamptz,
    PRIMARY KEY (app_id, journey_id, user_id, visit, seq)
)
-- A step is inserted on arrival and updated once on departure (output, exit_time: not
-- indexed): room on the page lets that update stay on it (HOT, no index writes).
WITH (fillfactor = 85);
-- Statistics over a time range: a departure is never before its arrival, so the arrivals
-- index bounds the departures too (one index less to write on every step).
CREATE INDEX path_steps_enter ON path_steps (journey_id, enter_time);

-- Every entry attempt, once per (journey, customer, trigger): makes entry idempotent and
-- counts refusals.
CREATE TABLE entries (
    app_id     text        NOT NULL,
    journey_id uuid        NOT NULL,
    user_id    uuid        NOT NULL,
    trigger_id text        NOT NULL,
    -- 'ENTERED' or why not (ALREADY_INSIDE, REENTRY_REFUSED, CONCURRENCY_LIMIT, ...).
    outcome    text        NOT NULL,
    entry_time timestamptz NOT NULL,
    PRIMARY KEY (app_id, journey_id, user_id, trigger_id)
);
CREATE INDEX entries_time ON entries (journey_id, entry_time);

-- What delivery reported about the journey's sends; one row per (send, status), so a message
-- clicked twice counts once.
CREATE TABLE send_receipts (
    app_id          text        NOT NULL,
    idempotency_key text        NOT NULL,
    status          text        NOT NULL,
    journey_id      uuid        NOT NULL,
    node_id         text        NOT NULL,
    user_id         uuid        NOT NULL,
    occurred_at     timestamptz NOT NULL,
    PRIMARY KEY (app_id, idempotency_key, status)
);
CREATE INDEX send_receipts_journey ON send_receipts (journey_id, occurred_at);
CREATE INDEX send_receipts_user ON send_receipts (journey_id, user_id);

-- Delivery's message id of each journey send, learnt from the first receipt that names both:
-- engagement receipts (opened, clicked) may carry only the message id.
CREATE TABLE send_messages (
    app_id          text NOT NULL,
    message_id      text NOT NULL,
    idempotency_key text NOT NULL,
    journey_id      uuid NOT NULL,
    node_id         text NOT NULL,
    user_id         uuid NOT NULL,
    PRIMARY KEY (app_id, message_id)
);

-- Entering an activation's audience (all contacts, a segment's members), page by page.
CREATE TABLE audience_jobs (
    app_id     text        NOT NULL,
    journey_id uuid        NOT NULL,
    version    integer     NOT NULL,
    kind       text        NOT NULL CHECK (kind IN ('all_contacts', 'segment', 'birthday')),
    segment_id text        NOT NULL DEFAULT '',
    page_token text        NOT NULL DEFAULT '',
    scanned    bigint      NOT NULL DEFAULT 0,
    entered    bigint      NOT NULL DEFAULT 0,
    -- Pages read from identity so far (the next page's number).
    pages      integer     NOT NULL DEFAULT 0,
    -- Everything was read (the job is over once its pages are entered too).
    done       boolean     NOT NULL DEFAULT false,
    -- Set while identity refuses (e.g. no credentials yet); retried after it.
    retry_at   timestamptz,
    last_error text        NOT NULL DEFAULT '',
    PRIMARY KEY (app_id, journey_id, version)
);
CREATE INDEX audience_jobs_todo ON audience_jobs (retry_at NULLS FIRST) WHERE NOT done;

-- All-contacts pages as read from identity: any replica's page workers claim those not entered
-- yet (SKIP LOCKED), so one activation is entered by several transactions at once, each
-- writing only its own page row. Entering is idempotent (trigger id).
CREATE TABLE audience_pages (
    app_id     text    NOT NULL,
    journey_id uuid    NOT NULL,
    version    integer NOT NULL,
    page_no    integer NOT NULL,
    user_ids   uuid[]  NOT NULL,
    -- Customers the page entered, once it was (NULL: waiting for a page worker).
    entered    integer,
    PRIMARY KEY (app_id, journey_id, version, page_no)
);
CREATE INDEX audience_pages_todo ON audience_pages (page_no) WHERE entered IS NULL;

-- Birthday journeys: each customer's next entry, in UTC, computed from the birthdate and time
-- zone; claimed like timers.
CREATE TABLE entry_timers (
    app_id     text        NOT NULL,
    journey_id uuid        NOT NULL,
    user_id    uuid        NOT NULL,
    due_at     timestamptz NOT NULL,
    -- 'birthday:<year>': the entry's trigger id.
    trigger_id text        NOT NULL,
    -- What the next year's entry is computed from.
    birth_month smallint   NOT NULL,
    birth_day   smallint   NOT NULL,
    timezone    text       NOT NULL DEFAULT '',
    PRIMARY KEY (app_id, journey_id, user_id)
);
CREATE INDEX entry_timers_due ON entry_timers (due_at);
