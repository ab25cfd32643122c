-- The accept of a batch of dispatches in one statement (issue 9: the accept path).
--
-- accept_dispatches(items) stores every item of a JSON array as the old per-request
-- statement did: the idempotency row (a key already there changes nothing), the
-- dispatch row 'queued' and its outbox event; then, for a new row, the refusal the
-- caller asked for, or the category's 'disabled' block, or a dead recipient, ends
-- it at once ('failed' / 'undeliverable', with its second event). It returns one
-- row per item, in order.
--
-- Tenancy: the function runs as its caller (SECURITY INVOKER): every item sets
-- triage.tenant_id before its statements, so row-level security judges each one
-- under its own tenant, exactly as one transaction per request did. The caller's
-- setting is restored at the end.
--
-- Each item runs in its own subtransaction (the EXCEPTION block): an unknown
-- tenant (a foreign key) or a value PostgreSQL refuses (a NUL byte, out of range)
-- fails that item alone, reported in `error` / `detail`, and writes nothing for it.
--
-- Item fields: tenant, id, key, hash, ttl_s, channel, template, version, category,
-- recipient, payload (an object), refuse_status and refuse_reason (both or neither).

CREATE FUNCTION dispatch_event_payload(x dispatches) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
    SELECT jsonb_build_object('id', x.id::text, 'tenant', x.tenant_id::text,
        'channel', x.channel::text, 'category', x.category, 'template', x.template,
        'status', x.status::text, 'reason', x.reason, 'provider', x.provider,
        'provider_ref', x.provider_ref, 'possible_duplicate', x.possible_duplicate)
    $$;

CREATE FUNCTION accept_dispatches(items jsonb)
    RETURNS TABLE (created boolean, old_hash text, old_id uuid, old_status text,
                   block text, status text, reason text, error text, detail text)
    LANGUAGE plpgsql
    AS $$
    DECLARE
        it jsonb;
        prev text := pg_catalog.current_setting('triage.tenant_id', true);
        row_id uuid;
        dead boolean;
        refuse_status text;
        refuse_reason text;
        problem text;
        x dispatches;
    BEGIN
        FOR it IN SELECT value FROM jsonb_array_elements(items) LOOP
            created := false; old_hash := NULL; old_id := NULL; old_status := NULL;
            block := NULL; status := NULL; reason := NULL; error := NULL; detail := NULL;
            BEGIN
                PERFORM pg_catalog.set_config('triage.tenant_id', it->>'tenant', true);
                row_id := (it->>'id')::uuid;
                INSERT INTO idempotency_keys (tenant_id, key, request_hash, response, expires_at)
                VALUES (current_tenant_id(), it->>'key', it->>'hash',
                        jsonb_build_object('dispatch_id', row_id::text),
                        now() + make_interval(secs => (it->>'ttl_s')::float8))
                ON CONFLICT (tenant_id, key) DO NOTHING;
                created := FOUND;
                SELECT b.state INTO block FROM category_blocks b
                    WHERE b.channel = it->>'channel' AND b.category = it->>'category';
                IF NOT created THEN
                    SELECT k.request_hash, d.id, d.status::text
                        INTO old_hash, old_id, old_status
                        FROM idempotency_keys k
                        LEFT JOIN dispatches d ON d.idempotency_key = k.key
                        WHERE k.key = it->>'key';
                ELSE
                    INSERT INTO dispatches (id, tenant_id, idempotency_key, channel, template,
                                            template_version, category, recipient, payload)
                    VALUES (row_id, current_tenant_id(), it->>'key', it->>'channel',
                            it->>'template', (it->>'version')::integer, it->>'category',
                            it->>'recipient', it->'payload')
                    RETURNING * INTO x;
                    INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, seq, subject, payload)
                    VALUES (x.tenant_id, 'dispatch', x.id::text, 1,
                            'triage.events.dispatch.' || x.status::text, dispatch_event_payload(x));
                    status := 'queued';
                    refuse_status := it->>'refuse_status';
                    refuse_reason := it->>'refuse_reason';
                    IF refuse_status IS NULL AND block = 'disabled' THEN
                        refuse_status := 'failed'; refuse_reason := 'category_disabled';
                    END IF;
                    IF refuse_status IS NULL THEN
                        dead := EXISTS (SELECT 1 FROM dead_recipients r
                                        WHERE r.channel = it->>'channel'
                                          AND r.recipient = it->>'recipient');
                        IF dead THEN
                            refuse_status := 'undeliverable'; refuse_reason := 'recipient_dead';
                        END IF;
                    END IF;
                    IF refuse_status IS NOT NULL THEN
                        UPDATE dispatches d SET status = refuse_status, reason = refuse_reason
                            WHERE d.id = row_id
                            RETURNING * INTO x;
                        INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, seq, subject, payload)
                        VALUES (x.tenant_id, 'dispatch', x.id::text, 1,
                                'triage.events.dispatch.' || x.status::text,
                                dispatch_event_payload(x));
                        status := refuse_status;
                        reason := refuse_reason;
                    END IF;
                END IF;
            EXCEPTION
                WHEN foreign_key_violation THEN
                    GET STACKED DIAGNOSTICS problem = CONSTRAINT_NAME;
                    created := false; status := NULL; reason := NULL;
                    error := 'foreign_key'; detail := problem;
                WHEN data_exception OR program_limit_exceeded THEN
                    created := false; status := NULL; reason := NULL;
                    error := 'unstorable'; detail := SQLERRM;
            END;
            RETURN NEXT;
        END LOOP;
        PERFORM pg_catalog.set_config('triage.tenant_id', coalesce(prev, ''), true);
    END
    $$;

GRANT EXECUTE ON FUNCTION dispatch_event_payload(dispatches) TO triage_app;
GRANT EXECUTE ON FUNCTION accept_dispatches(jsonb) TO triage_app;

-- One status change and its event, as the per-statement transition did: the row
-- locked, the move made only if the status machine allows it and it changes
-- something. No row when the dispatch is not there (for this tenant); `moved` 0
-- for a duplicate or an out-of-order move.
CREATE FUNCTION dispatch_transition(row_id uuid, new_status text, new_reason text,
                                    new_provider text, new_provider_ref text,
                                    duplicate boolean)
    RETURNS TABLE (old text, moved integer)
    LANGUAGE plpgsql
    AS $$
    DECLARE
        x dispatches;
    BEGIN
        SELECT d.status::text INTO old FROM dispatches d WHERE d.id = row_id FOR UPDATE;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        moved := 0;
        IF old <> new_status AND dispatch_transition_allowed(old, new_status) THEN
            UPDATE dispatches d SET
                status = new_status,
                reason = coalesce(new_reason, d.reason),
                provider = coalesce(new_provider, d.provider),
                provider_ref = coalesce(new_provider_ref, d.provider_ref),
                dispatched_at = CASE WHEN new_status = 'dispatched' THEN now() ELSE d.dispatched_at END,
                possible_duplicate = d.possible_duplicate OR duplicate
            WHERE d.id = row_id
            RETURNING * INTO x;
            INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, seq, subject, payload)
            VALUES (x.tenant_id, 'dispatch', x.id::text, 1,
                    'triage.events.dispatch.' || x.status::text, dispatch_event_payload(x));
            moved := 1;
        END IF;
        RETURN NEXT;
    END
    $$;

-- The outcomes of several sends in one statement: items are
-- {tenant, steps: [{id, status, reason, provider, provider_ref, possible_duplicate}]};
-- each item under its own tenant. A step that moved a dispatch out of 'queued'
-- applies the receipts that arrived early (early_receipts), in arrival order.
-- One row per step: (item, step, old, moved); no row for a missing dispatch.
CREATE FUNCTION record_transitions(items jsonb)
    RETURNS TABLE (item integer, step integer, old text, moved integer)
    LANGUAGE plpgsql
    AS $$
    DECLARE
        it jsonb;
        st jsonb;
        early record;
        prev text := pg_catalog.current_setting('triage.tenant_id', true);
        t record;
    BEGIN
        item := 0;
        FOR it IN SELECT value FROM jsonb_array_elements(items) LOOP
            PERFORM pg_catalog.set_config('triage.tenant_id', it->>'tenant', true);
            step := 0;
            FOR st IN SELECT value FROM jsonb_array_elements(it->'steps') LOOP
                SELECT * INTO t FROM dispatch_transition(
                    (st->>'id')::uuid, st->>'status', st->>'reason', st->>'provider',
                    st->>'provider_ref', coalesce((st->>'possible_duplicate')::boolean, false));
                IF FOUND THEN
                    old := t.old; moved := t.moved;
                    RETURN NEXT;
                    IF t.moved = 1 AND t.old = 'queued' THEN
                        FOR early IN
                            WITH taken AS (
                                DELETE FROM early_receipts e WHERE e.dispatch_id = (st->>'id')::uuid
                                RETURNING e.state, e.reason, e.received_at)
                            SELECT * FROM taken ORDER BY received_at
                        LOOP
                            PERFORM dispatch_transition((st->>'id')::uuid, early.state,
                                                        early.reason, NULL, NULL, false);
                        END LOOP;
                    END IF;
                END IF;
                step := step + 1;
            END LOOP;
            item := item + 1;
        END LOOP;
        PERFORM pg_catalog.set_config('triage.tenant_id', coalesce(prev, ''), true);
    END
    $$;

GRANT EXECUTE ON FUNCTION dispatch_transition(uuid, text, text, text, text, boolean) TO triage_app;
GRANT EXECUTE ON FUNCTION record_transitions(jsonb) TO triage_app;
