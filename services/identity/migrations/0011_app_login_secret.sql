-- An app's login secret (docs/identity.md, "Login proofs"): when set, a client key's Login must
-- carry HMAC-SHA256(secret, external_id). Sealed with identity's SecretBox (AES-256-GCM bound to
-- 'apps/<app_id>/login_secret'); NULL means the app has none. Never returned by the API.
ALTER TABLE apps ADD COLUMN login_secret bytea;
