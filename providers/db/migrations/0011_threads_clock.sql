-- 0011_threads_clock: a participant joins only its own tenant's thread, as RLS sees it
-- (row 12); read receipts stamped by the database clock (row 16).
--
-- Row 12. 0001 already ties a participant row to its thread's tenant with the
-- composite foreign key (thread_id, tenant_id) -> threads (id, tenant_id), and
-- 0002's policy makes the row's tenant the transaction's tenant. What was
-- missing is the link between the two inside row-level security: a write that
-- names another tenant's thread fails the foreign key (23503) only after RLS
-- admitted it, and a role that bypasses RLS is held by the key alone. The
-- restrictive policies below make RLS itself demand, on INSERT and UPDATE, that
-- the thread is one the current tenant can see (the subquery on threads runs
-- under threads' own policy) and that the participant row, the thread and
-- current_tenant_id() name the same tenant. A cross-tenant participant is then
-- refused as 42501 (insufficient_privilege, "new row violates row-level
-- security policy"), whichever of the three tenants differs; the foreign key
-- stays as the backstop for roles outside RLS.
--
-- Restrictive policies are ANDed with the permissive tenant_isolation policy of
-- 0002, so they can only narrow what it admits.

CREATE POLICY participant_joins_own_thread ON thread_participants
    AS RESTRICTIVE FOR INSERT TO triage_app
    WITH CHECK (
        tenant_id = current_tenant_id()
        AND EXISTS (
            SELECT FROM threads t
            WHERE t.id = thread_participants.thread_id
              AND t.tenant_id = thread_participants.tenant_id
              AND t.tenant_id = current_tenant_id()
        )
    );

CREATE POLICY participant_stays_in_own_thread ON thread_participants
    AS RESTRICTIVE FOR UPDATE TO triage_app
    USING (tenant_id = current_tenant_id())
    WITH CHECK (
        tenant_id = current_tenant_id()
        AND EXISTS (
            SELECT FROM threads t
            WHERE t.id = thread_participants.thread_id
              AND t.tenant_id = thread_participants.tenant_id
              AND t.tenant_id = current_tenant_id()
        )
    );

-- Row 16. A read receipt says a participant read a thread up to now. Its time
-- is the database's clock_timestamp() -- one clock for every daemon, whatever
-- their hosts' clocks say -- set by the trigger below on every insert and
-- update, so a value sent by the application (from a skewed host) is never
-- stored. Receipts order by (read_at, id).

CREATE TABLE read_receipts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       uuid NOT NULL,
    thread_id       uuid NOT NULL,
    participant_id  text NOT NULL,
    read_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT read_receipts_same_tenant FOREIGN KEY (thread_id, tenant_id)
        REFERENCES threads (id, tenant_id) ON DELETE CASCADE,
    CONSTRAINT read_receipts_participant FOREIGN KEY (thread_id, participant_id)
        REFERENCES thread_participants (thread_id, participant_id) ON DELETE CASCADE
);

CREATE INDEX read_receipts_thread_order ON read_receipts (tenant_id, thread_id, read_at, id);

CREATE FUNCTION read_receipts_database_time() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    NEW.read_at := pg_catalog.clock_timestamp();
    RETURN NEW;
END
$$;

CREATE TRIGGER read_receipts_database_time
    BEFORE INSERT OR UPDATE ON read_receipts
    FOR EACH ROW EXECUTE FUNCTION read_receipts_database_time();

GRANT SELECT, INSERT, DELETE ON read_receipts TO triage_app;

ALTER TABLE read_receipts ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON read_receipts TO triage_app
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());
