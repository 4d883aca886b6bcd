-- Run once by the official postgres image, on first start with an empty volume, as the
-- POSTGRES_USER (tidings), which therefore owns them: one database per service, as on the
-- native stack (scripts/stack.sh). Each service creates its own tables by migrating at start-up.
CREATE DATABASE tidings_identity;
CREATE DATABASE tidings_journey;
CREATE DATABASE tidings_delivery;
