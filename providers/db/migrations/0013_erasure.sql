-- 0013_erasure: the GDPR erasure saga (catalog row 15).
--
-- * erasures: one row per erasure request of a patient of a tenant. patient_id is
--   kept for the reconciler: it searches every store for what the saga should have
--   removed, and replays the saga when it finds residue (a missed event). The
--   receipt (jsonb) and its signature (HMAC-SHA256, hex) are rewritten at the end
--   of every run of the saga; attempts counts the runs. traces keeps what the
--   reconciler checks again (idempotency keys, blob keys, recording files): it may
--   name the patient, so it is never part of the receipt.
-- * erasure_steps: one row per request and data class, the step's record: done,
--   exempt (the legal reason is in detail) or failed (the error); erased counts
--   what this run removed, erased_total every run's. A step repeated changes only
--   the counts: each step is idempotent (a delete of what matches).
--
-- The saga erases tenant rows as the tenant (triage_app, under RLS) and dead
-- letters as triage_relay (a dead letter may have lost its tenant).

CREATE TABLE erasures (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id     uuid NOT NULL REFERENCES tenants (id),
    patient_id    text NOT NULL CHECK (patient_id <> ''),
    identifiers   jsonb NOT NULL DEFAULT '[]',          -- recipient addresses of the patient
    status        text NOT NULL DEFAULT 'running'
                  CHECK (status IN ('running', 'done', 'partial')),
    attempts      integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    requested_at  timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz,
    reconciled_at timestamptz,
    residue_found bigint NOT NULL DEFAULT 0 CHECK (residue_found >= 0),
    receipt       jsonb,
    traces        jsonb NOT NULL DEFAULT '{}',          -- keys and files erased (not in the receipt)
    signature     text,
    CONSTRAINT erasures_one_per_patient UNIQUE (tenant_id, patient_id)
);

CREATE TABLE erasure_steps (
    erasure_id    uuid NOT NULL REFERENCES erasures (id) ON DELETE CASCADE,
    tenant_id     uuid NOT NULL REFERENCES tenants (id),
    data_class    text NOT NULL CHECK (data_class <> ''),
    status        text NOT NULL CHECK (status IN ('done', 'exempt', 'failed')),
    erased        bigint NOT NULL DEFAULT 0 CHECK (erased >= 0),
    erased_total  bigint NOT NULL DEFAULT 0 CHECK (erased_total >= 0),
    detail        text NOT NULL DEFAULT '',
    runs          integer NOT NULL DEFAULT 1 CHECK (runs >= 1),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (erasure_id, data_class)
);

-- Grants ----------------------------------------------------------------------------

GRANT SELECT, INSERT, UPDATE ON erasures TO triage_app;
GRANT SELECT, INSERT, UPDATE ON erasure_steps TO triage_app;
-- The reconciler lists every tenant's finished erasures.
GRANT SELECT ON erasures TO triage_relay;

-- What the saga deletes as the tenant (RLS keeps it to the tenant's rows).
GRANT DELETE ON outbox, outbox_sequences TO triage_app;
GRANT DELETE ON virtual_sessions, fallback_threads, recordings, attachments TO triage_app;

-- Row-level security ----------------------------------------------------------------

ALTER TABLE erasures ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON erasures TO triage_app
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());
CREATE POLICY relay_all_tenants ON erasures FOR SELECT TO triage_relay USING (true);

ALTER TABLE erasure_steps ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON erasure_steps TO triage_app
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());
