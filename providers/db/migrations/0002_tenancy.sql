-- 0002_tenancy: roles, grants and row-level security.
--
-- Roles (cluster-wide, so created only if missing; a migration of a second
-- database on the same server reuses them):
--
--   triage_app     NOLOGIN group role: the DML grants on tenant tables. Its
--                  policies admit only the rows of the tenant named by the
--                  transaction-local setting triage.tenant_id.
--   triage_relay   NOLOGIN group role for system actors (outbox relay,
--                  dead-letter list and redrive): every tenant's rows of
--                  outbox, outbox_sequences and dead_letters, and nothing
--                  else -- no grant at all on dispatches, inbox, threads,
--                  templates, idempotency keys or tenants.
--   triage_daemon  LOGIN role the daemon connects as: NOSUPERUSER,
--                  NOBYPASSRLS, owns nothing. Member of triage_app (inherited)
--                  and of triage_relay WITHOUT inheritance: a relay unit of
--                  work must say SET LOCAL ROLE triage_relay, so tenant code
--                  never sees other tenants' outbox rows by accident.
--
-- The tables stay owned by the role that runs the migrations (an owner or a
-- superuser), never by these roles. FORCE ROW LEVEL SECURITY makes RLS apply
-- to the owner too (superusers and BYPASSRLS roles excepted). No password is
-- set here: with password authentication, set one out of band
-- (ALTER ROLE triage_daemon PASSWORD ...).

DO $$
DECLARE
    group_role text;
BEGIN
    FOREACH group_role IN ARRAY ARRAY['triage_app', 'triage_relay'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = group_role) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', group_role);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created meanwhile by a migration of another database
            END;
        END IF;
    END LOOP;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'triage_daemon') THEN
        BEGIN
            CREATE ROLE triage_daemon LOGIN INHERIT
                NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
    -- Roles that existed before must not defeat RLS either.
    IF EXISTS (
        SELECT FROM pg_catalog.pg_roles
        WHERE rolname IN ('triage_app', 'triage_relay', 'triage_daemon')
          AND (rolsuper OR rolbypassrls)
    ) THEN
        RAISE EXCEPTION 'roles triage_app, triage_relay and triage_daemon must be NOSUPERUSER NOBYPASSRLS'
            USING HINT = 'ALTER ROLE ... NOSUPERUSER NOBYPASSRLS, then migrate again';
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO triage_app', current_database());
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO triage_app, triage_relay', current_schema());
END
$$;

GRANT triage_app TO triage_daemon WITH INHERIT TRUE;
GRANT triage_relay TO triage_daemon WITH INHERIT FALSE, SET TRUE;

-- The tenant of the current transaction, or NULL when none is set. After a
-- SET LOCAL / set_config(..., true) ends, the setting reads '' (not NULL) for
-- the rest of the session: both mean "no tenant", and no row matches NULL. A
-- value that is not a uuid is an error, never a match.
CREATE FUNCTION current_tenant_id() RETURNS uuid
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT nullif(pg_catalog.current_setting('triage.tenant_id', true), '')::uuid $$;

-- Grants ------------------------------------------------------------------------

GRANT SELECT ON schema_migrations TO triage_app, triage_relay;

GRANT SELECT ON tenants TO triage_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON dispatches TO triage_app;
GRANT SELECT, INSERT ON outbox TO triage_app;
GRANT SELECT, INSERT, UPDATE ON outbox_sequences TO triage_app;
GRANT USAGE ON SEQUENCE outbox_id_seq TO triage_app;
GRANT SELECT, INSERT, DELETE ON inbox TO triage_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON idempotency_keys TO triage_app;
GRANT SELECT, INSERT ON dead_letters TO triage_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON threads TO triage_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON thread_participants TO triage_app;
GRANT SELECT, INSERT, UPDATE ON templates TO triage_app;

-- The relay may mark rows published, count attempts and purge, but never
-- rewrite an event; it may insert (a redrive appends the event again).
GRANT SELECT, INSERT, DELETE ON outbox TO triage_relay;
GRANT UPDATE (published_at, attempts, last_error) ON outbox TO triage_relay;
GRANT SELECT, INSERT, UPDATE ON outbox_sequences TO triage_relay;
GRANT USAGE ON SEQUENCE outbox_id_seq TO triage_relay;
GRANT SELECT, INSERT, DELETE ON dead_letters TO triage_relay;
GRANT UPDATE (redriven_at, attempts, error) ON dead_letters TO triage_relay;

-- Row-level security ----------------------------------------------------------
--
-- Policies name their role: any other role (PUBLIC included) that gains a
-- grant by mistake still sees no row.

ALTER TABLE tenants ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_self ON tenants FOR SELECT TO triage_app
    USING (id = current_tenant_id());

ALTER TABLE dispatches ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON dispatches TO triage_app
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());

ALTER TABLE outbox ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON outbox TO triage_app
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());
CREATE POLICY relay_all_tenants ON outbox TO triage_relay
    USING (true) WITH CHECK (true);

ALTER TABLE outbox_sequences ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON outbox_sequences TO triage_app
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());
CREATE POLICY relay_all_tenants ON outbox_sequences TO triage_relay
    USING (true) WITH CHECK (true);

ALTER TABLE inbox ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON inbox TO triage_app
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());

ALTER TABLE idempotency_keys ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON idempotency_keys TO triage_app
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());

-- A dead letter without a tenant is visible to the relay role only.
ALTER TABLE dead_letters ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON dead_letters TO triage_app
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());
CREATE POLICY relay_all_tenants ON dead_letters TO triage_relay
    USING (true) WITH CHECK (true);

ALTER TABLE threads ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON threads TO triage_app
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());

ALTER TABLE thread_participants ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON thread_participants TO triage_app
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());

ALTER TABLE templates ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON templates TO triage_app
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());
