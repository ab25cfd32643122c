-- 0014_erasure_key: the erasure saga's key, made once and kept (catalog row 15).
--
-- The key signs erasure receipts and makes the patient token of a subject
-- (<prefix>.<tenant>.<HMAC(key, tenant:patient)>.<kind>): a token made with another
-- key would not find the messages published under the first. Without
-- [erasure] receipt_key_file, the first daemon to start inserts a random key here
-- and every replica and every restart reads the same one (INSERT ... ON CONFLICT DO
-- NOTHING, then SELECT: two replicas racing agree on the row that won).
--
-- Only triage_relay (the system actors' role) reads it; the tenant role cannot.

CREATE TABLE erasure_keys (
    name        text PRIMARY KEY CHECK (name <> ''),
    secret      bytea NOT NULL CHECK (octet_length(secret) >= 32),
    created_at  timestamptz NOT NULL DEFAULT now()
);

REVOKE ALL ON erasure_keys FROM PUBLIC;
GRANT SELECT, INSERT ON erasure_keys TO triage_relay;
