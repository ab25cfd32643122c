-- 0006_attachments: uploaded attachments and their antivirus scan (catalog rows 8, 17).
--
-- One row per attachment, written by the upload admission once its bytes are
-- stored (the blob store holds them under blob_key), and moved by the scanner
-- pool through its scan:
--
--   pending ──> clean      clamd answered "stream: OK": the only state served
--      ├──────> infected   clamd found a signature; the blob is quarantined
--      └──────> failed     the scan failed max_attempts times (a clamd ERROR,
--                          its size limit): never taken for clean
--
-- A row is inserted 'pending'; the three others are final. Every scan attempt
-- that failed is counted in scan_attempts with its last_error, so a failed row
-- says why. A row never changes its id, tenant, blob or size.

CREATE DOMAIN attachment_status AS text
    CHECK (VALUE IN ('pending', 'clean', 'infected', 'failed'));

CREATE TABLE attachments (
    id             uuid PRIMARY KEY,
    tenant_id      uuid NOT NULL REFERENCES tenants (id),
    blob_key       text NOT NULL UNIQUE CHECK (blob_key <> ''),
    filename       text NOT NULL DEFAULT '' CHECK (length(filename) <= 255),
    content_type   text NOT NULL DEFAULT 'application/octet-stream',
    size_bytes     bigint NOT NULL CHECK (size_bytes >= 0),
    sha256         text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    status         attachment_status NOT NULL DEFAULT 'pending',
    signature      text,
    scan_attempts  integer NOT NULL DEFAULT 0 CHECK (scan_attempts >= 0),
    last_error     text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    scanned_at     timestamptz,
    CHECK ((status = 'infected') = (signature IS NOT NULL)),
    CHECK (status <> 'failed' OR last_error IS NOT NULL)
);

-- The scanner's work queue after a restart: the pending rows, oldest first.
CREATE INDEX attachments_pending_created_at ON attachments (created_at)
    WHERE status = 'pending';

CREATE FUNCTION attachments_guard() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            IF NEW.status <> 'pending' THEN
                RAISE EXCEPTION 'an attachment starts pending, not %', NEW.status
                    USING ERRCODE = 'check_violation',
                          CONSTRAINT = 'attachments_status_transition',
                          TABLE = 'attachments';
            END IF;
            RETURN NEW;
        END IF;
        IF NEW.id <> OLD.id OR NEW.tenant_id <> OLD.tenant_id OR NEW.blob_key <> OLD.blob_key
           OR NEW.size_bytes <> OLD.size_bytes OR NEW.sha256 <> OLD.sha256 THEN
            RAISE EXCEPTION 'an attachment never changes its id, tenant or bytes (attachment %)',
                    OLD.id
                USING ERRCODE = 'check_violation',
                      CONSTRAINT = 'attachments_status_transition',
                      TABLE = 'attachments';
        END IF;
        IF OLD.status <> 'pending' AND NEW.status <> OLD.status THEN
            RAISE EXCEPTION 'illegal attachment status transition % -> % (attachment %)',
                    OLD.status, NEW.status, OLD.id
                USING ERRCODE = 'check_violation',
                      CONSTRAINT = 'attachments_status_transition',
                      TABLE = 'attachments',
                      HINT = 'pending -> clean | infected | failed; those are final';
        END IF;
        RETURN NEW;
    END
    $$;

CREATE TRIGGER attachments_guard
    BEFORE INSERT OR UPDATE ON attachments
    FOR EACH ROW EXECUTE FUNCTION attachments_guard();

-- Grants and row-level security, as 0002 does for every tenant table ----------

GRANT SELECT, INSERT, UPDATE ON attachments TO triage_app;

ALTER TABLE attachments ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON attachments TO triage_app
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());

-- The scanner pool reloads its queue after a restart as triage_relay: the ids,
-- tenants, blob keys and attempts of pending rows of every tenant, and nothing
-- else (no file name, no content type); each scan result is then written per tenant,
-- under the policy above.
GRANT SELECT (id, tenant_id, blob_key, size_bytes, status, scan_attempts, created_at)
    ON attachments TO triage_relay;
CREATE POLICY relay_pending_read ON attachments FOR SELECT TO triage_relay
    USING (status = 'pending');
