-- Profiles, their aliases, custom-attribute definitions and the record of merges.
-- Hot tables carry (app_id, user_id) in their keys so they can be distributed by user (Citus).

CREATE TABLE users (
    app_id      text        NOT NULL,
    user_id     uuid        NOT NULL,
    -- NULL while the profile is anonymous; immutable once set.
    external_id text,
    first_name  text,
    last_name   text,
    email       text,
    phone       text,
    -- Date of birth in parts, because the year may be unknown (google.type.Date with year 0):
    -- birthday journeys match (birth_month, birth_day), ages need birth_year too.
    birth_year  smallint    CHECK (birth_year BETWEEN 1 AND 9999),
    birth_month smallint    CHECK (birth_month BETWEEN 1 AND 12),
    birth_day   smallint    CHECK (birth_day BETWEEN 1 AND 31),
    timezone    text,
    language    text,
    country     text,
    -- Custom attributes as plain JSON values (string, number, bool; timestamps as RFC 3339
    -- strings): the type of each name is fixed by customer_fields, so segments can cast.
    attributes  jsonb       NOT NULL DEFAULT '{}',
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, user_id),
    CHECK ((birth_month IS NULL) = (birth_day IS NULL)),
    CHECK (birth_year IS NULL OR birth_month IS NOT NULL)
)
-- Profiles are updated far more often than created: free room on each page lets an update
-- that leaves the indexed columns alone stay on its page (a HOT update, no index writes).
WITH (fillfactor = 80);
CREATE UNIQUE INDEX users_external_id ON users (app_id, external_id) WHERE external_id IS NOT NULL;
-- ListUsers pages by (create_time, user_id).
CREATE INDEX users_page ON users (app_id, create_time, user_id);
-- Birthday entries of journeys: whose birthday is on a given day.
CREATE INDEX users_birthday ON users (app_id, birth_month, birth_day) WHERE birth_month IS NOT NULL;

CREATE TABLE user_aliases (
    app_id      text        NOT NULL,
    label       text        NOT NULL,
    value       text        NOT NULL,
    user_id     uuid        NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, label, value),
    -- One value per label per user.
    UNIQUE (app_id, user_id, label),
    FOREIGN KEY (app_id, user_id) REFERENCES users (app_id, user_id) ON DELETE CASCADE
);

CREATE TABLE customer_fields (
    app_id       text        NOT NULL,
    name         text        NOT NULL,
    type         text        NOT NULL CHECK (type IN ('string', 'number', 'bool', 'timestamp')),
    description  text        NOT NULL DEFAULT '',
    pii          boolean     NOT NULL DEFAULT false,
    auto_defined boolean     NOT NULL DEFAULT false,
    create_time  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, name)
);

-- Every Login that folded an anonymous profile into a known one: who, from, into, when.
CREATE TABLE user_merges (
    app_id          text        NOT NULL,
    into_user_id    uuid        NOT NULL,
    from_user_id    uuid        NOT NULL,
    subscription_id uuid,
    key_id          text        NOT NULL,
    merge_time      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, into_user_id, from_user_id)
);
