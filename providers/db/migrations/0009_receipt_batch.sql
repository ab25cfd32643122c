-- Delivery receipts applied in one statement per batch (issue 9: the receipt path).
--
-- apply_receipts(items) applies every item of a JSON array as the old per-receipt
-- statements did: the receipt's dispatch (by id, else by provider + provider_ref),
-- its status change and outbox event (dispatch_transition, migration 0005) when the
-- status machine allows it; a receipt that overtook its send (the row still
-- 'queued') is kept in early_receipts, applied by the transaction that records the
-- send (record_transitions). A duplicate receipt changes nothing (moved 0).
--
-- Tenancy: SECURITY INVOKER; every item sets triage.tenant_id before its statements,
-- so row-level security judges each one under its own tenant (a receipt naming the
-- wrong tenant finds no dispatch). The caller's setting is restored at the end.
--
-- Lock order: the dispatches are resolved first, then changed in dispatch-id order
-- (arrival order within one dispatch), whatever the order of the items: two
-- batches with overlapping receipts never deadlock each other.
--
-- No subtransaction per item (each would take an xid; more than 64 overflow the
-- backend's subxid cache): the items are validated by the caller, and a batch that
-- fails anyway is run again item by item by the group commit (actors/group_commit.py),
-- so one bad item fails alone.
--
-- Item fields: tenant, id (or null), provider, provider_ref (or null), status
-- ('delivered' | 'failed' | 'undeliverable'), reason (or null).
-- One row per item, in lock order: (item, dispatch_id, old, moved, early);
-- dispatch_id and old are NULL when no dispatch was found.

CREATE FUNCTION apply_receipts(items jsonb)
    RETURNS TABLE (item integer, dispatch_id uuid, old text, moved integer, early boolean)
    LANGUAGE plpgsql
    AS $$
    DECLARE
        it jsonb;
        prev text := pg_catalog.current_setting('triage.tenant_id', true);
        ids uuid[] := '{}';
        rid uuid;
        i integer;
        t record;
    BEGIN
        FOR i IN 0 .. jsonb_array_length(items) - 1 LOOP
            it := items -> i;
            rid := (it ->> 'id')::uuid;
            IF rid IS NULL AND it ->> 'provider_ref' IS NOT NULL THEN
                PERFORM pg_catalog.set_config('triage.tenant_id', it ->> 'tenant', true);
                SELECT d.id INTO rid FROM dispatches d
                    WHERE d.provider = it ->> 'provider' AND d.provider_ref = it ->> 'provider_ref'
                    LIMIT 1;
            END IF;
            ids := ids || rid;
        END LOOP;
        FOR i IN
            SELECT u.ord - 1 FROM unnest(ids) WITH ORDINALITY AS u(id, ord)
            ORDER BY u.id NULLS FIRST, u.ord
        LOOP
            it := items -> i;
            item := i; dispatch_id := ids[i + 1]; old := NULL; moved := 0; early := false;
            IF dispatch_id IS NOT NULL THEN
                PERFORM pg_catalog.set_config('triage.tenant_id', it ->> 'tenant', true);
                SELECT * INTO t FROM dispatch_transition(
                    dispatch_id, it ->> 'status', it ->> 'reason', NULL, NULL, false);
                IF FOUND THEN
                    old := t.old; moved := t.moved;
                    IF t.moved = 0 AND t.old = 'queued' THEN
                        INSERT INTO early_receipts (tenant_id, dispatch_id, state, reason,
                                                    provider, provider_ref)
                        VALUES (current_tenant_id(), dispatch_id, it ->> 'status',
                                it ->> 'reason', it ->> 'provider', it ->> 'provider_ref')
                        ON CONFLICT DO NOTHING;
                        early := true;
                    END IF;
                ELSE
                    dispatch_id := NULL;
                END IF;
            END IF;
            RETURN NEXT;
        END LOOP;
        PERFORM pg_catalog.set_config('triage.tenant_id', coalesce(prev, ''), true);
    END
    $$;

GRANT EXECUTE ON FUNCTION apply_receipts(jsonb) TO triage_app;
