-- 0008_tokens_recordings: join tokens (catalog row 10) and recording ingests (row 20).
--
-- * join_tokens: one row per join token issued (its jti), with the kid that
--   signed it, the session and the room. A revoked token (revoked_at) is refused
--   at verification. Tenant rows under RLS; the relay role revokes across
--   tenants (every token of a compromised kid) and reads them for the record.
-- * join_key_retirements: kids that may no longer sign or verify. The key ring
--   signs with the first kid (in name order) of its directory that is not here,
--   so every replica and every restart agrees on the signing key.
-- * join_token_incidents: the forensic record of each mitigation: who ran it,
--   when, which kid, the failures by reason and their origins, which tokens and
--   sessions were revoked, and which kid signs now.
-- * recordings: one row per recording to ingest, unique per tenant; pending,
--   then ingested (size, sha256, where it is stored) or failed (the reason; its
--   dead letter and its recording.failed event are written in the same
--   transaction). claimed_until: a replica working on a pending row leases it.
--
-- The two system tables have no tenant: only triage_relay may use them.

CREATE TABLE join_tokens (
    jti          uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (id),
    session_id   text NOT NULL CHECK (session_id <> ''),
    room         text NOT NULL CHECK (room <> ''),
    kid          text NOT NULL CHECK (kid <> ''),
    user_id      text NOT NULL,
    issued_at    timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    revoked_at   timestamptz,
    revoked_reason text
);

CREATE INDEX join_tokens_live_by_kid ON join_tokens (kid) WHERE revoked_at IS NULL;

CREATE TABLE join_key_retirements (
    kid          text PRIMARY KEY CHECK (kid <> ''),
    retired_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    reason       text NOT NULL CHECK (reason <> '')
);

CREATE TABLE join_token_incidents (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kid            text NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    detected_at    timestamptz NOT NULL,
    recorded_by    text NOT NULL,
    reason         text NOT NULL,
    failures       jsonb NOT NULL DEFAULT '{}',   -- reason -> count in the detector's window
    origins        jsonb NOT NULL DEFAULT '[]',   -- where the refused tokens came from
    revoked_tokens integer NOT NULL DEFAULT 0 CHECK (revoked_tokens >= 0),
    sessions       jsonb NOT NULL DEFAULT '[]',   -- [{"tenant_id", "session_id", "room"}]
    new_kid        text
);

CREATE TABLE recordings (
    tenant_id     uuid NOT NULL REFERENCES tenants (id),
    recording_id  text NOT NULL CHECK (recording_id <> ''),
    session_id    text,
    path          text NOT NULL CHECK (path <> ''),
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'ingested', 'failed')),
    attempts      integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    size_bytes    bigint,
    sha256        text,
    stored_path   text,
    last_error    text,
    claimed_until timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, recording_id)
);

CREATE INDEX recordings_pending ON recordings (created_at) WHERE status = 'pending';

-- Grants ----------------------------------------------------------------------------

GRANT SELECT, INSERT ON join_tokens TO triage_app;
GRANT SELECT ON join_tokens TO triage_relay;
GRANT UPDATE (revoked_at, revoked_reason) ON join_tokens TO triage_relay;
GRANT SELECT, INSERT ON join_key_retirements TO triage_relay;
GRANT SELECT, INSERT ON join_token_incidents TO triage_relay;
GRANT USAGE ON SEQUENCE join_token_incidents_id_seq TO triage_relay;

GRANT SELECT, INSERT, UPDATE ON recordings TO triage_app;
GRANT SELECT ON recordings TO triage_relay;
GRANT UPDATE (claimed_until) ON recordings TO triage_relay;

-- Row-level security ----------------------------------------------------------------

ALTER TABLE join_tokens ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON join_tokens TO triage_app
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());
CREATE POLICY relay_all_tenants ON join_tokens TO triage_relay
    USING (true) WITH CHECK (true);

ALTER TABLE recordings ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON recordings TO triage_app
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());
CREATE POLICY relay_all_tenants ON recordings TO triage_relay
    USING (true) WITH CHECK (true);
