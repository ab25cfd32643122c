-- 0010_slo: the service level indicators, counted where the truth is (issue 11,
-- the error-budget policy of the seed's section 2).
--
-- Two SLOs, each a ratio of good events to all events:
--
-- * dispatch_success: a dispatch that ends counts once, when it first reaches
--   an end: 'delivered' is good; 'failed' and 'unknown' are bad. 'undeliverable'
--   (the recipient is gone: a dead number, an unregistered device, a hard
--   bounce) is the recipient's doing, not ours, and is not counted. A dispatch
--   that went 'unknown' and later 'delivered' stays counted bad: the patient was
--   not confirmed reached within the feedback deadline.
-- * send_latency: a dispatch a provider took ('queued' -> 'dispatched') counts
--   once, with the seconds from acceptance to the provider's answer; the daemon
--   judges it good or bad against [slo.objectives.send_latency].threshold_s when
--   it rolls the samples up (the threshold is config, not schema).
--
-- slo_samples is written by a statement trigger on dispatches, whatever code path
-- moved the status (the group commits, the sweeps, an operator's SQL): one
-- INSERT ... SELECT per UPDATE statement, append-only, so the accept and
-- outcome paths take no shared lock. The daemon's error-budget actor takes
-- samples (FOR UPDATE SKIP LOCKED: several replicas never take one twice),
-- folds them into per-minute buckets (slo_buckets) and deletes them, in one
-- statement (slo_rollup). Buckets older than the retention it passes are
-- deleted in the same statement.
--
-- config_applied records the digest of the adapter sections ([providers],
-- [channels]) each time a daemon starts with them, so that a start with changed
-- adapters can be refused while the error budget is frozen; an override (break
-- glass) is recorded with its reason.
--
-- None of these tables holds tenant data or PHI: no RLS; the daemon's role
-- reads and writes them.

CREATE TABLE slo_samples (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    slo        text NOT NULL CHECK (slo IN ('dispatch_success', 'send_latency')),
    good       boolean,              -- dispatch_success: the verdict
    latency_s  double precision      -- send_latency: judged at rollup
        CHECK (latency_s IS NULL OR latency_s >= 0),
    CHECK ((slo = 'dispatch_success') = (good IS NOT NULL)),
    CHECK ((slo = 'send_latency') = (latency_s IS NOT NULL))
);

CREATE TABLE slo_buckets (
    minute  timestamptz NOT NULL,
    slo     text NOT NULL CHECK (slo IN ('dispatch_success', 'send_latency')),
    good    bigint NOT NULL DEFAULT 0 CHECK (good >= 0),
    bad     bigint NOT NULL DEFAULT 0 CHECK (bad >= 0),
    PRIMARY KEY (slo, minute)
);

CREATE TABLE config_applied (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    applied_at   timestamptz NOT NULL DEFAULT now(),
    digest       text NOT NULL CHECK (digest <> ''),
    sections     jsonb NOT NULL,       -- section -> digest of that section
    source       text NOT NULL,        -- the config file
    override     text                  -- a break-glass start during a freeze: why
        CHECK (override IS NULL OR override <> '')
);

CREATE FUNCTION dispatches_slo_samples() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    INSERT INTO slo_samples (slo, good, latency_s)
    SELECT 'dispatch_success', n.status = 'delivered', NULL
      FROM new_rows n JOIN old_rows o USING (id)
     WHERE o.status IN ('queued', 'dispatched')
       AND n.status IN ('delivered', 'failed', 'unknown')
    UNION ALL
    SELECT 'send_latency', NULL,
           greatest(0, extract(epoch FROM coalesce(n.dispatched_at, now()) - n.created_at))
      FROM new_rows n JOIN old_rows o USING (id)
     WHERE o.status = 'queued' AND n.status IN ('dispatched', 'delivered');
    RETURN NULL;
END
$$;

CREATE TRIGGER dispatches_slo_samples AFTER UPDATE ON dispatches
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dispatches_slo_samples();

-- Take up to max_samples samples, fold them into slo_buckets, drop buckets older
-- than retain_s; answer per SLO what this call counted (for the daemon's counters).
CREATE FUNCTION slo_rollup(latency_threshold_s double precision, max_samples integer,
                           retain_s double precision)
    RETURNS TABLE (slo text, good bigint, bad bigint)
    LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM slo_buckets b WHERE b.minute < now() - make_interval(secs => retain_s);
    RETURN QUERY
    WITH taken AS (
        DELETE FROM slo_samples s
         WHERE s.id IN (SELECT t.id FROM slo_samples t ORDER BY t.id LIMIT max_samples
                        FOR UPDATE SKIP LOCKED)
        RETURNING s.at, s.slo,
                  coalesce(s.good, s.latency_s <= latency_threshold_s) AS ok
    ), folded AS (
        SELECT date_trunc('minute', t.at) AS minute, t.slo,
               count(*) FILTER (WHERE t.ok) AS good, count(*) FILTER (WHERE NOT t.ok) AS bad
          FROM taken t GROUP BY 1, 2
    ), stored AS (
        INSERT INTO slo_buckets AS b (minute, slo, good, bad)
        SELECT f.minute, f.slo, f.good, f.bad FROM folded f
        ON CONFLICT ON CONSTRAINT slo_buckets_pkey
        DO UPDATE SET good = b.good + excluded.good, bad = b.bad + excluded.bad
    )
    SELECT f.slo, sum(f.good)::bigint, sum(f.bad)::bigint
      FROM folded f
     GROUP BY f.slo;
END
$$;

GRANT SELECT, INSERT, UPDATE, DELETE ON slo_samples TO triage_app;  -- UPDATE: FOR UPDATE
GRANT SELECT, INSERT, UPDATE, DELETE ON slo_buckets TO triage_app;
GRANT SELECT, INSERT ON config_applied TO triage_app;
GRANT EXECUTE ON FUNCTION slo_rollup(double precision, integer, double precision) TO triage_app;
