-- Values of PII customer fields are sealed at rest (services/identity/pii.py). A flip of the
-- pii flag converts the field's stored values in batches; until it is done the field is not
-- settled, and a restarted service finishes the conversion (services/identity/pii_fields.py).
ALTER TABLE customer_fields ADD COLUMN pii_settled boolean NOT NULL DEFAULT true;
CREATE INDEX customer_fields_unsettled ON customer_fields (app_id, name) WHERE NOT pii_settled;
