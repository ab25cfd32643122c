-- 0001_core: the tables of the durable backbone.
--
-- Every tenant table carries tenant_id (uuid, NOT NULL unless said otherwise);
-- row-level security, the roles and the grants come in 0002_tenancy.sql.
-- Applied in one transaction by providers.db.migrate; never edit this file once
-- it has been applied anywhere: add a new numbered migration instead.

DO $$
BEGIN
    -- 0002 grants the relay role to the daemon WITH INHERIT FALSE (PostgreSQL 16+).
    IF current_setting('server_version_num')::integer < 160000 THEN
        RAISE EXCEPTION 'Triage needs PostgreSQL 16 or newer; this server is %',
            current_setting('server_version');
    END IF;
END
$$;

CREATE DOMAIN dispatch_channel AS text
    CHECK (VALUE IN ('sms', 'push', 'email'));

CREATE DOMAIN dispatch_status AS text
    CHECK (VALUE IN ('queued', 'dispatched', 'delivered', 'failed', 'undeliverable', 'unknown'));

-- Tenants ---------------------------------------------------------------------

CREATE TABLE tenants (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL UNIQUE CHECK (name <> ''),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Dispatches: one outgoing message and its status machine ---------------------
--
--   queued ──> dispatched ──> delivered
--     │            ├────────> failed          (needs a reason)
--     │            ├────────> undeliverable   (needs a reason)
--     │            └────────> unknown ──> delivered | failed | undeliverable
--     ├──> failed          (refused before sending: template missing, PHI guard, ...)
--     └──> undeliverable   (known unreachable before sending: no device token, opt-out)
--
-- A row is inserted as 'queued'. 'dispatched' means a provider accepted it.
-- 'unknown' means it may or may not have been sent (a provider timeout, a
-- stalled push feedback); a late receipt may still settle it. delivered, failed
-- and undeliverable are final. There is no way back to 'queued' or
-- 'dispatched': re-sending is a new dispatch, never a silent second send.
-- Writing the same status again is allowed (a duplicate receipt is a no-op).

CREATE TABLE dispatches (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id         uuid NOT NULL REFERENCES tenants (id),
    idempotency_key   text,
    channel           dispatch_channel NOT NULL,
    template          text NOT NULL,
    template_version  integer,
    recipient         text NOT NULL,
    payload           jsonb NOT NULL DEFAULT '{}',
    status            dispatch_status NOT NULL DEFAULT 'queued',
    reason            text,
    provider          text,
    provider_ref      text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    -- Nothing is sent twice for one idempotency key.
    CONSTRAINT dispatches_idempotency_key UNIQUE (tenant_id, idempotency_key),
    -- Every outcome other than delivered says why.
    CONSTRAINT dispatches_reason_required
        CHECK (status NOT IN ('failed', 'undeliverable', 'unknown') OR reason IS NOT NULL)
);

CREATE INDEX dispatches_tenant_status ON dispatches (tenant_id, status, created_at);
CREATE INDEX dispatches_provider_ref ON dispatches (provider, provider_ref)
    WHERE provider_ref IS NOT NULL;

-- The allowed moves of the machine drawn above (same status included).
CREATE FUNCTION dispatch_transition_allowed(old_status text, new_status text)
    RETURNS boolean
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$
        SELECT old_status = new_status OR (old_status, new_status) IN (
            ('queued', 'dispatched'),
            ('queued', 'failed'),
            ('queued', 'undeliverable'),
            ('dispatched', 'delivered'),
            ('dispatched', 'failed'),
            ('dispatched', 'undeliverable'),
            ('dispatched', 'unknown'),
            ('unknown', 'delivered'),
            ('unknown', 'failed'),
            ('unknown', 'undeliverable')
        )
    $$;

-- Refuses an insert that does not start queued, an illegal transition and a
-- change of id or tenant; keeps updated_at. Errors are check_violation (23514)
-- with the constraint name dispatches_status_transition.
CREATE FUNCTION dispatches_guard() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            IF NEW.status <> 'queued' THEN
                RAISE EXCEPTION 'a dispatch starts queued, not %', NEW.status
                    USING ERRCODE = 'check_violation',
                          CONSTRAINT = 'dispatches_status_transition',
                          TABLE = 'dispatches';
            END IF;
            RETURN NEW;
        END IF;
        IF NEW.id <> OLD.id OR NEW.tenant_id <> OLD.tenant_id THEN
            RAISE EXCEPTION 'a dispatch never changes its id or tenant (dispatch %)', OLD.id
                USING ERRCODE = 'check_violation',
                      CONSTRAINT = 'dispatches_status_transition',
                      TABLE = 'dispatches';
        END IF;
        IF NOT dispatch_transition_allowed(OLD.status, NEW.status) THEN
            RAISE EXCEPTION 'illegal dispatch status transition % -> % (dispatch %)',
                    OLD.status, NEW.status, OLD.id
                USING ERRCODE = 'check_violation',
                      CONSTRAINT = 'dispatches_status_transition',
                      TABLE = 'dispatches',
                      HINT = 'queued -> dispatched | failed | undeliverable; '
                          || 'dispatched -> delivered | failed | undeliverable | unknown; '
                          || 'unknown -> delivered | failed | undeliverable';
        END IF;
        NEW.updated_at := now();
        RETURN NEW;
    END
    $$;

CREATE TRIGGER dispatches_guard
    BEFORE INSERT OR UPDATE ON dispatches
    FOR EACH ROW EXECUTE FUNCTION dispatches_guard();

-- Outbox: domain events written in the same transaction as the state change ---
--
-- id is the global publish identity (Nats-Msg-Id); seq numbers the events of
-- one aggregate from 1. Both are assigned by outbox_assign_order below, AFTER
-- the writer locks its aggregate's counter row in outbox_sequences: writers of
-- one aggregate are serialised until commit, so within an aggregate the order
-- of seq, of id and of commit are the same. Across aggregates, ids may become
-- visible out of order (a lower id can commit later): never use "the highest
-- published id" as a watermark.

CREATE SEQUENCE outbox_id_seq AS bigint;

CREATE TABLE outbox (
    id              bigint PRIMARY KEY,
    tenant_id       uuid NOT NULL REFERENCES tenants (id),
    aggregate_type  text NOT NULL CHECK (aggregate_type <> ''),
    aggregate_id    text NOT NULL CHECK (aggregate_id <> ''),
    seq             bigint NOT NULL CHECK (seq >= 1),
    subject         text NOT NULL CHECK (subject <> ''),
    payload         jsonb NOT NULL,
    headers         jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error      text,
    CONSTRAINT outbox_aggregate_seq UNIQUE (tenant_id, aggregate_type, aggregate_id, seq)
);

ALTER SEQUENCE outbox_id_seq OWNED BY outbox.id;

-- The relay's work queue: unpublished rows in id order.
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

CREATE TABLE outbox_sequences (
    tenant_id       uuid NOT NULL REFERENCES tenants (id),
    aggregate_type  text NOT NULL,
    aggregate_id    text NOT NULL,
    last_seq        bigint NOT NULL CHECK (last_seq >= 1),
    PRIMARY KEY (tenant_id, aggregate_type, aggregate_id)
);

-- Any id or seq given by the writer is replaced.
CREATE FUNCTION outbox_assign_order() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
    BEGIN
        INSERT INTO outbox_sequences AS s (tenant_id, aggregate_type, aggregate_id, last_seq)
            VALUES (NEW.tenant_id, NEW.aggregate_type, NEW.aggregate_id, 1)
            ON CONFLICT (tenant_id, aggregate_type, aggregate_id)
            DO UPDATE SET last_seq = s.last_seq + 1
            RETURNING s.last_seq INTO NEW.seq;
        NEW.id := nextval('outbox_id_seq');
        RETURN NEW;
    END
    $$;

CREATE TRIGGER outbox_assign_order
    BEFORE INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION outbox_assign_order();

-- Inbox: incoming events already applied (row 18) -----------------------------
--
-- The consumer inserts the inbox row and applies the event's effect in one
-- transaction, and acks after commit: a redelivered event hits the unique key
-- and changes nothing.

CREATE TABLE inbox (
    tenant_id       uuid NOT NULL REFERENCES tenants (id),
    appointment_id  text NOT NULL CHECK (appointment_id <> ''),
    source          text NOT NULL,
    message_key     text,
    subject         text,
    received_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT inbox_tenant_appointment PRIMARY KEY (tenant_id, appointment_id)
);

-- Idempotency keys: the database's answer is the truth (row 7) ----------------

CREATE TABLE idempotency_keys (
    tenant_id     uuid NOT NULL REFERENCES tenants (id),
    key           text NOT NULL CHECK (key <> ''),
    request_hash  text NOT NULL,
    response      jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    CONSTRAINT idempotency_keys_tenant_key PRIMARY KEY (tenant_id, key),
    CONSTRAINT idempotency_keys_expiry CHECK (expires_at > created_at)
);

CREATE INDEX idempotency_keys_expires_at ON idempotency_keys (expires_at);

-- Dead letters: items a consumer gave up on (rows 9, 18, 20) -------------------
--
-- tenant_id is NULL when the item's tenant is unknown (a poison message that
-- does not parse). payload is bytea: a dead letter must accept what is not
-- valid JSON. An item is dead-lettered at most once while it waits for redrive.

CREATE TABLE dead_letters (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    uuid REFERENCES tenants (id),
    source       text NOT NULL CHECK (source <> ''),
    ref          text NOT NULL,
    subject      text,
    payload      bytea NOT NULL,
    headers      jsonb NOT NULL DEFAULT '{}',
    error        text NOT NULL,
    attempts     integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    redriven_at  timestamptz
);

CREATE UNIQUE INDEX dead_letters_pending_ref ON dead_letters (source, ref)
    WHERE redriven_at IS NULL;

-- Threads and participants (row 12) --------------------------------------------
--
-- A participant row carries its tenant, and the composite foreign key makes it
-- equal to its thread's tenant: a participant can never join another tenant's
-- thread, even for a role that bypasses RLS.

CREATE TABLE threads (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    topic       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    closed_at   timestamptz,
    CONSTRAINT threads_id_tenant UNIQUE (id, tenant_id)
);

CREATE TABLE thread_participants (
    thread_id       uuid NOT NULL,
    tenant_id       uuid NOT NULL,
    participant_id  text NOT NULL CHECK (participant_id <> ''),
    role            text NOT NULL CHECK (role <> ''),
    joined_at       timestamptz NOT NULL DEFAULT now(),
    left_at         timestamptz,
    PRIMARY KEY (thread_id, participant_id),
    CONSTRAINT thread_participants_same_tenant FOREIGN KEY (thread_id, tenant_id)
        REFERENCES threads (id, tenant_id) ON DELETE CASCADE
);

CREATE INDEX thread_participants_participant ON thread_participants (tenant_id, participant_id);

-- Templates (rows 11, 19) -------------------------------------------------------
--
-- Versions are immutable in spirit: a change is a new version. At most one
-- version of a name is active, so a lookup can never be ambiguous; a retired
-- version is never active.

CREATE TABLE templates (
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    name        text NOT NULL CHECK (name <> ''),
    version     integer NOT NULL CHECK (version >= 1),
    channel     dispatch_channel NOT NULL,
    subject     text,
    body        text NOT NULL,
    active      boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    retired_at  timestamptz,
    CONSTRAINT templates_tenant_name_version UNIQUE (tenant_id, name, version),
    CONSTRAINT templates_retired_inactive CHECK (NOT (active AND retired_at IS NOT NULL))
);

CREATE UNIQUE INDEX templates_one_active ON templates (tenant_id, name) WHERE active;
