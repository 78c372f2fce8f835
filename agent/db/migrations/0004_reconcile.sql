-- 0004: reconciliation. A run checks a scope (a site, one device, one service) and repairs drift;
-- each device of the run becomes one reconcile message on the queue, fed a few at a time by the
-- site's leader so that commands go first.
ALTER TABLE agent.events DROP CONSTRAINT events_kind_check;
ALTER TABLE agent.events ADD CONSTRAINT events_kind_check CHECK (kind IN (
    'applied', 'verified', 'noop', 'refreshed', 'failed', 'retried', 'superseded', 'duplicate', 'expired',
    'dead_lettered', 'replayed', 'parked', 'drift', 'repaired', 'unreadable'));

CREATE TABLE agent.sync_runs (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    site         text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('scheduled', 'manual')),
    device       text,                    -- scope: NULL = every device of the site
    service      text,                    -- scope: NULL = every service with a desired state
    dry_run      boolean NOT NULL DEFAULT false,
    requested_by text,
    requested_at timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    devices      integer NOT NULL DEFAULT 0,
    checked      integer NOT NULL DEFAULT 0,
    in_sync      integer NOT NULL DEFAULT 0,
    drifted      integer NOT NULL DEFAULT 0,   -- found different (repaired or, in a dry run, left)
    repaired     integer NOT NULL DEFAULT 0,
    unreadable   integer NOT NULL DEFAULT 0,
    failed       integer NOT NULL DEFAULT 0    -- drift found, repair failed
);
CREATE INDEX sync_runs_open ON agent.sync_runs (site) WHERE finished_at IS NULL;

CREATE TABLE agent.sync_devices (
    run     bigint NOT NULL REFERENCES agent.sync_runs ON DELETE CASCADE,
    device  text NOT NULL,
    state   text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'done')),
    msg_id  bigint,
    sent_at timestamptz,
    done_at timestamptz,
    PRIMARY KEY (run, device)
);
CREATE INDEX sync_devices_open ON agent.sync_devices (run) WHERE state <> 'done';

-- What a run found, per service (scheduled runs keep only what was not in sync).
CREATE TABLE agent.sync_items (
    run      bigint NOT NULL REFERENCES agent.sync_runs ON DELETE CASCADE,
    device   text NOT NULL,
    service  text NOT NULL,
    expected text,
    found    text,
    result   text NOT NULL CHECK (result IN ('in_sync', 'drift', 'repaired', 'unreadable', 'failed')),
    error    text,
    at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run, device, service)
);

-- Ask for a reconcile of a scope; returns the run id. Works from any host with database access:
-- the site's leading agent feeds the run to the queue. A run with nothing to check is finished at once.
CREATE FUNCTION agent.request_sync(
    site      text,
    device    text DEFAULT NULL,
    service   text DEFAULT NULL,
    dry_run   boolean DEFAULT false,
    kind      text DEFAULT 'manual',
    requested_by text DEFAULT current_user
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    run_id bigint;
    n      integer;
BEGIN
    IF site IS NULL THEN
        RAISE EXCEPTION 'agent.request_sync: site must not be NULL' USING ERRCODE = '22023';
    END IF;
    IF kind NOT IN ('scheduled', 'manual') THEN
        RAISE EXCEPTION 'agent.request_sync: kind must be ''scheduled'' or ''manual''' USING ERRCODE = '22023';
    END IF;
    IF request_sync.device IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM agent.devices d WHERE d.id = request_sync.device AND d.site = request_sync.site) THEN
        RAISE EXCEPTION 'agent.request_sync: no device % in site %', quote_literal(request_sync.device),
            quote_literal(request_sync.site) USING ERRCODE = '22023', HINT = 'see agentctl device list';
    END IF;
    INSERT INTO agent.sync_runs (site, kind, device, service, dry_run, requested_by)
    VALUES (request_sync.site, request_sync.kind, request_sync.device, request_sync.service,
            request_sync.dry_run, request_sync.requested_by)
    RETURNING id INTO run_id;
    INSERT INTO agent.sync_devices (run, device)
    SELECT DISTINCT run_id, s.device
    FROM agent.service_state s JOIN agent.devices d ON d.id = s.device
    WHERE d.site = request_sync.site AND s.desired IS NOT NULL
      AND (request_sync.device IS NULL OR s.device = request_sync.device)
      AND (request_sync.service IS NULL OR s.service = request_sync.service);
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE agent.sync_runs r SET devices = n, finished_at = CASE WHEN n = 0 THEN now() END WHERE r.id = run_id;
    PERFORM pg_notify('agent_sync', CASE WHEN n = 0 THEN run_id::text ELSE 'requested' END);
    RETURN run_id;
END $$;
