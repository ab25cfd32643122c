-- 0003_channels: what the SMS, push and email channels need (issue 4).
--
-- * dispatches learn their category (from the template), when a provider took
--   them (dispatched_at: the clock of the stale-feedback sweep, row 2) and
--   whether they may have been sent twice (possible_duplicate: an ambiguous
--   provider timeout that no status query could settle, never silently).
-- * templates carry the category their messages belong to (row 3 counts
--   bounces per tenant and category).
-- * category_blocks: a tenant's category that is throttled or disabled after a
--   bounce spike (row 3); a row exists while it is, and only an operator
--   removes a 'disabled' one (`triage category enable`).
-- * dead_recipients: device tokens and addresses a provider said are gone
--   (UNREGISTERED, 410, hard bounce): never sent to again.

ALTER TABLE dispatches
    ADD COLUMN category text NOT NULL DEFAULT 'default' CHECK (category <> ''),
    ADD COLUMN dispatched_at timestamptz,
    ADD COLUMN possible_duplicate boolean NOT NULL DEFAULT false;

-- The row-2 sweep: dispatched rows of one channel, oldest first.
CREATE INDEX dispatches_dispatched_at ON dispatches (channel, dispatched_at)
    WHERE status = 'dispatched';

ALTER TABLE templates
    ADD COLUMN category text NOT NULL DEFAULT 'default' CHECK (category <> '');

CREATE TABLE category_blocks (
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    channel     dispatch_channel NOT NULL,
    category    text NOT NULL CHECK (category <> ''),
    state       text NOT NULL CHECK (state IN ('throttled', 'disabled')),
    reason      text NOT NULL CHECK (reason <> ''),
    since       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, channel, category)
);

CREATE TABLE dead_recipients (
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    channel     dispatch_channel NOT NULL,
    recipient   text NOT NULL CHECK (recipient <> ''),
    reason      text NOT NULL CHECK (reason <> ''),
    marked_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, channel, recipient)
);

-- A receipt can overtake the send it reports on: a fast provider's DLR may arrive
-- before the dispatch row records 'dispatched' (or while an ambiguous timeout is
-- being settled). It waits here and is applied in the transaction that records the
-- send; nothing is dropped for arriving early.
CREATE TABLE early_receipts (
    tenant_id     uuid NOT NULL REFERENCES tenants (id),
    dispatch_id   uuid NOT NULL,
    state         text NOT NULL CHECK (state IN ('delivered', 'failed', 'undeliverable')),
    reason        text,
    provider      text NOT NULL CHECK (provider <> ''),
    provider_ref  text,
    received_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, dispatch_id, state)
);

GRANT SELECT, INSERT, DELETE ON early_receipts TO triage_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON category_blocks TO triage_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON dead_recipients TO triage_app;

ALTER TABLE category_blocks ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON category_blocks TO triage_app
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());

ALTER TABLE early_receipts ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON early_receipts TO triage_app
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());

ALTER TABLE dead_recipients ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON dead_recipients TO triage_app
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());

-- The row-2 sweep is a system actor (it runs for every tenant, like the relay):
-- as triage_relay it may see dispatched rows (never their recipient or payload)
-- and move them to 'unknown', nothing else.
GRANT SELECT (id, tenant_id, channel, category, status, provider, provider_ref, dispatched_at)
    ON dispatches TO triage_relay;
GRANT UPDATE (status, reason) ON dispatches TO triage_relay;
-- (An UPDATE with a WHERE clause checks its new row against the SELECT policy
-- too, so the read policy must admit the 'unknown' it writes.)
CREATE POLICY relay_stale_read ON dispatches FOR SELECT TO triage_relay
    USING (status IN ('dispatched', 'unknown'));
CREATE POLICY relay_stale_mark ON dispatches FOR UPDATE TO triage_relay
    USING (status = 'dispatched') WITH CHECK (status = 'unknown');
