-- Customer fields of type 'date': a calendar date with no time of day or zone (birthdays,
-- renewal dates), stored in users.attributes as an ISO 'YYYY-MM-DD' string.
ALTER TABLE customer_fields DROP CONSTRAINT customer_fields_type_check;
ALTER TABLE customer_fields ADD CONSTRAINT customer_fields_type_check
    CHECK (type IN ('string', 'number', 'bool', 'timestamp', 'date'));

-- A date attribute ('YYYY-MM-DD', as users.py and the imports store it) read back as a date.
-- ISO dates read the same under every DateStyle, so the result does not depend on the session:
-- declared IMMUTABLE so an expression index can use it (docs/segments.md, "Indexes").
CREATE FUNCTION segment_date(value text) RETURNS date
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT value::date
$$;
