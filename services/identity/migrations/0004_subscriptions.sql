-- Devices and addresses. A (type, token) is on at most one profile of an app: registering it
-- again moves it.

CREATE TABLE subscriptions (
    app_id             text        NOT NULL,
    subscription_id    uuid        NOT NULL,
    user_id            uuid        NOT NULL,
    type               text        NOT NULL CHECK (type IN (
                           'ios_push', 'android_push', 'web_push', 'email', 'sms', 'whatsapp',
                           'telegram')),
    token              text        NOT NULL,
    web_push_p256dh    text,
    web_push_auth      text,
    enabled            boolean     NOT NULL DEFAULT true,
    disabled_reason    text        NOT NULL DEFAULT '',
    opt_in             text        NOT NULL DEFAULT 'subscribed'
                           CHECK (opt_in IN ('subscribed', 'unsubscribed')),
    opt_in_change_time timestamptz NOT NULL DEFAULT now(),
    opt_in_reason      text        NOT NULL DEFAULT '',
    -- DeviceInfo: {"model", "os", "app_version", "sdk"}.
    device             jsonb       NOT NULL DEFAULT '{}',
    last_active_time   timestamptz NOT NULL DEFAULT now(),
    -- When the current token was last presented (registered, registered again, changed): a
    -- provider's "token is dead" about a send before that is stale and is ignored.
    token_time         timestamptz NOT NULL DEFAULT now(),
    create_time        timestamptz NOT NULL DEFAULT now(),
    update_time        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, subscription_id),
    UNIQUE (app_id, type, token),
    FOREIGN KEY (app_id, user_id) REFERENCES users (app_id, user_id)
);
CREATE INDEX subscriptions_user ON subscriptions (app_id, user_id, last_active_time);
