-- 0012_phi_incidents: the PHI guard's mitigations (catalog row 11).
--
-- * templates.retired_reason: why a version was retired (the PHI guard writes
--   'phi_guard: <rule>'). A retired version is never returned by a lookup and
--   never active (templates_retired_inactive, 0001); a dispatch naming it is
--   refused with this reason.
-- * incidents: one row per privacy incident -- a push the guard refused, or a find
--   of the PII scanner in a log file or a dead letter. It names the rule that
--   matched and keeps a redacted excerpt: never the PHI itself. ref says where
--   (dispatch:<id>, log:<dev>:<inode>:<offset>, dlq:<dead letter id>) and is
--   unique per source: the same find recorded twice (a scanner restarted, a
--   retried trip) is one incident.

ALTER TABLE templates ADD COLUMN retired_reason text;
ALTER TABLE templates ADD CONSTRAINT templates_retired_reason
    CHECK (retired_reason IS NULL OR retired_at IS NOT NULL);

CREATE TABLE incidents (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id         uuid REFERENCES tenants (id),        -- NULL: a log line of no tenant
    kind              text NOT NULL CHECK (kind <> ''),     -- 'phi_leak'
    source            text NOT NULL CHECK (source IN ('push_guard', 'log', 'dlq')),
    ref               text NOT NULL CHECK (ref <> ''),
    template          text,
    template_version  integer,
    channel           text,
    category          text,
    rule              text NOT NULL CHECK (rule <> ''),
    location          text NOT NULL,                        -- data.<key>, body, $.path
    excerpt           text NOT NULL,                        -- redacted
    detected_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT incidents_source_ref UNIQUE (source, ref)
);

CREATE INDEX incidents_tenant_detected ON incidents (tenant_id, detected_at);

-- The guard writes as the tenant (triage_app), the scanner as triage_relay (it reads
-- every tenant's dead letters, and a log line may belong to none). Neither may
-- change or delete an incident.
GRANT SELECT, INSERT ON incidents TO triage_app, triage_relay;

ALTER TABLE incidents ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON incidents TO triage_app
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());
CREATE POLICY relay_all_tenants ON incidents TO triage_relay
    USING (true) WITH CHECK (true);
