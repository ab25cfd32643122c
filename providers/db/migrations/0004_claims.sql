-- 0004_claims: every accepted dispatch ends, whichever replica survives (issue 13).
--
-- Two system sweeps work on the dispatch rows of every tenant, and several
-- replicas of the daemon run each of them:
--
-- * the backlog resumer takes the 'queued' rows a crash (or a full dispatcher)
--   left behind and offers them to its dispatchers;
-- * the status sweep takes the SMS and email rows stuck 'dispatched' (their
--   receipt lost), asks the provider, and ends them 'unknown' after the deadline.
--
-- claimed_until: no sweep takes the row again before this moment. A sweep sets
-- it in the statement that locks the rows it takes (FOR UPDATE SKIP LOCKED), so
-- two replicas never take one row; the rows of a replica that died holding them
-- are free again once the claim lapses. NULL: never claimed.

ALTER TABLE dispatches ADD COLUMN claimed_until timestamptz;

-- The resumer's work queue: the queued rows of one channel, oldest first.
CREATE INDEX dispatches_queued_created_at ON dispatches (channel, created_at)
    WHERE status = 'queued';

-- Both sweeps run as triage_relay, as the row-2 sweep does (0003): they see the
-- non-PHI columns of queued and dispatched rows and may move the claim, never
-- read a recipient or a payload (the resumer reads those per tenant, under RLS,
-- for the rows it claimed). The status machine (dispatches_guard) still refuses
-- every move but the ones 0003 granted: status can only stay what it is here.
GRANT SELECT (created_at, claimed_until) ON dispatches TO triage_relay;
GRANT UPDATE (claimed_until) ON dispatches TO triage_relay;
CREATE POLICY relay_claim_read ON dispatches FOR SELECT TO triage_relay
    USING (status = 'queued');
CREATE POLICY relay_claim ON dispatches FOR UPDATE TO triage_relay
    USING (status IN ('queued', 'dispatched'))
    WITH CHECK (status IN ('queued', 'dispatched'));
