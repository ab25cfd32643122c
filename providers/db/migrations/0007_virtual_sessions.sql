-- 0007_virtual_sessions: virtual-care rooms and their fallback threads (rows 4, 14).
--
-- virtual_sessions: one row per appointment, created by the inbox in the same
-- transaction as the inbox row (row 18), so a redelivered scheduling event never
-- makes a second session: UNIQUE (tenant_id, appointment_id) is the truth. The
-- Jitsi pool (actors/jitsi_pool.py) places a session on a videobridge node
-- ('placed': node + room), or ends it 'failed' (no bridge could host it, or its
-- bridge was lost); a failed session is placed again once a bridge is healthy.
-- fallback_thread_id links a session whose visit failed to its fallback thread.
--
-- fallback_threads: the fallback message threads, at most `cap` per patient and
-- day. The cap is enforced here as well as in the actor: a row takes a slot
-- 1..cap (PRIMARY KEY (tenant, patient, day, slot): two replicas racing for the
-- same slot cannot both win), and the trigger refuses a slot above the
-- transaction-local setting triage.fallback_cap (no setting: refused, fail
-- closed). So however many visits fail and however many daemons spawn threads,
-- a patient-day never has more than `cap` fallback threads.
--
-- Tenancy: both tables are tenant tables (RLS as 0002). The pool works across
-- tenants as triage_relay: it sees and moves the placement columns of
-- virtual_sessions only (never patient_id), as the sweeps of 0004 do; the fallback
-- sweep, also as triage_relay, finds failed sessions that have no fallback thread.

CREATE TABLE virtual_sessions (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id           uuid NOT NULL REFERENCES tenants (id),
    appointment_id      text NOT NULL CHECK (appointment_id <> ''),
    patient_id          text CHECK (patient_id <> ''),
    starts_at           timestamptz,
    state               text NOT NULL DEFAULT 'pending'
                        CHECK (state IN ('pending', 'placed', 'failed')),
    node                text,
    room                text,
    attempts            integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    failovers           integer NOT NULL DEFAULT 0 CHECK (failovers >= 0),
    failures            integer NOT NULL DEFAULT 0 CHECK (failures >= 0),
    failure             text,
    claimed_until       timestamptz,
    fallback_thread_id  uuid,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT virtual_sessions_one_per_appointment UNIQUE (tenant_id, appointment_id),
    CONSTRAINT virtual_sessions_id_tenant UNIQUE (id, tenant_id),
    CONSTRAINT virtual_sessions_placed_has_room
        CHECK (state <> 'placed' OR (node IS NOT NULL AND room IS NOT NULL)),
    CONSTRAINT virtual_sessions_fallback_same_tenant FOREIGN KEY (fallback_thread_id, tenant_id)
        REFERENCES threads (id, tenant_id)
);

-- The pool's work queue: sessions waiting for a bridge, oldest first.
CREATE INDEX virtual_sessions_waiting ON virtual_sessions (created_at)
    WHERE state IN ('pending', 'failed');
CREATE INDEX virtual_sessions_by_node ON virtual_sessions (node) WHERE state = 'placed';
-- The fallback sweep's work: failed visits still without their fallback thread.
CREATE INDEX virtual_sessions_without_fallback ON virtual_sessions (updated_at)
    WHERE failures > 0 AND fallback_thread_id IS NULL;

CREATE TABLE fallback_threads (
    tenant_id       uuid NOT NULL REFERENCES tenants (id),
    patient_id      text NOT NULL CHECK (patient_id <> ''),
    day             date NOT NULL,
    slot            integer NOT NULL CHECK (slot >= 1),
    thread_id       uuid NOT NULL,
    appointment_id  text NOT NULL CHECK (appointment_id <> ''),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, patient_id, day, slot),
    CONSTRAINT fallback_threads_one_thread UNIQUE (thread_id),
    CONSTRAINT fallback_threads_same_tenant FOREIGN KEY (thread_id, tenant_id)
        REFERENCES threads (id, tenant_id)
);

CREATE FUNCTION fallback_threads_cap() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    cap integer := nullif(pg_catalog.current_setting('triage.fallback_cap', true), '')::integer;
BEGIN
    IF cap IS NULL THEN
        RAISE EXCEPTION 'fallback_threads: triage.fallback_cap is not set in this transaction'
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.slot > cap THEN
        RAISE EXCEPTION 'fallback_threads: patient-day cap of % threads reached (slot %)',
            cap, NEW.slot
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER fallback_threads_cap BEFORE INSERT OR UPDATE OF slot ON fallback_threads
    FOR EACH ROW EXECUTE FUNCTION fallback_threads_cap();

-- Grants and row-level security ---------------------------------------------------------

GRANT SELECT, INSERT, UPDATE ON virtual_sessions TO triage_app;
GRANT SELECT, INSERT ON fallback_threads TO triage_app;

GRANT SELECT (id, tenant_id, appointment_id, state, node, room, attempts, failovers,
              failures, failure, claimed_until, fallback_thread_id, created_at, updated_at)
    ON virtual_sessions TO triage_relay;
GRANT UPDATE (state, node, room, attempts, failovers, failures, failure, claimed_until,
              updated_at)
    ON virtual_sessions TO triage_relay;

ALTER TABLE virtual_sessions ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON virtual_sessions TO triage_app
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());
CREATE POLICY relay_placement_read ON virtual_sessions FOR SELECT TO triage_relay
    USING (true);
CREATE POLICY relay_placement ON virtual_sessions FOR UPDATE TO triage_relay
    USING (true) WITH CHECK (true);

ALTER TABLE fallback_threads ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON fallback_threads TO triage_app
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());
