-- 0010: reconciliation that a paused or unreachable device cannot wedge. Expand only: agents of
-- schema 5 to 9 keep working against it (min_agent_schema stays 5).
-- * agent.sync_devices.skipped: why a device of a run was not checked (paused, unreachable for longer
--   than AGENT_RECONCILE_UNREACHABLE_WAIT, removed): the run finishes with it reported, not open forever.
ALTER TABLE agent.sync_devices ADD COLUMN skipped text;
-- * agent.request_sync checks what a producer may say. The run is recorded as asked for by the
--   session's login role (a `requested_by` given is kept after it, in parentheses, as a label: at most
--   200 characters, none of them control); a `scheduled` run only from the agents (members of
--   agent_worker or agent_worker_common, or the schema's owner); the site must exist (agent.sites or a device of it), the
--   service must be a valid service key, and a site holds at most 1000 unfinished runs.
CREATE OR REPLACE FUNCTION agent.request_sync(
    site      text DEFAULT NULL,
    device    text DEFAULT NULL,
    service   text DEFAULT NULL,
    dry_run   boolean DEFAULT false,
    kind      text DEFAULT 'manual',
    requested_by text DEFAULT current_user
) RETURNS bigint LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    run_id bigint;
    n      integer;
    target text := request_sync.site;  -- the site the run is for
    who    text := session_user;       -- who asked: the login role, whatever the caller says
    label  text := request_sync.requested_by;
    owner  name := (SELECT r.rolname FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner
                    WHERE n.nspname = 'agent');
BEGIN
    IF label IS NOT NULL AND (length(label) = 0 OR length(label) > 200 OR label ~ '[\x01-\x1f\x7f-\x9f]') THEN
        RAISE EXCEPTION 'agent.request_sync: requested_by must be 1 to 200 characters, none of them control'
            USING ERRCODE = '22023';
    END IF;
    IF request_sync.site IS NOT NULL AND (length(request_sync.site) NOT BETWEEN 1 AND 64
                                          OR request_sync.site ~ '[\x01-\x1f\x7f-\x9f]') THEN
        RAISE EXCEPTION 'agent.request_sync: site must be 1 to 64 characters, none of them control'
            USING ERRCODE = '22023';
    END IF;
    IF request_sync.device IS NOT NULL AND request_sync.device !~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$' THEN
        RAISE EXCEPTION 'agent.request_sync: device is not a valid device id' USING ERRCODE = '22023';
    END IF;
    IF request_sync.service IS NOT NULL AND request_sync.service !~ '^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,199}$' THEN
        RAISE EXCEPTION 'agent.request_sync: service is not a valid service key' USING ERRCODE = '22023';
    END IF;
    IF kind IS NULL OR kind NOT IN ('scheduled', 'manual') THEN
        RAISE EXCEPTION 'agent.request_sync: kind must be ''scheduled'' or ''manual''' USING ERRCODE = '22023';
    END IF;
    IF kind = 'scheduled' AND NOT (pg_has_role(who, owner, 'MEMBER') OR EXISTS (
            SELECT 1 FROM pg_roles r WHERE r.rolname IN ('agent_worker', 'agent_worker_common')
              AND pg_has_role(who, r.oid, 'MEMBER'))) THEN
        RAISE EXCEPTION 'agent.request_sync: only the site''s agents start scheduled runs'
            USING ERRCODE = '42501', HINT = 'ask for a manual run: kind => ''manual'' (the default)';
    END IF;
    IF target IS NULL AND request_sync.device IS NOT NULL THEN
        SELECT d.site INTO target FROM agent.devices d WHERE d.id = request_sync.device;
        IF target IS NULL THEN
            RAISE EXCEPTION 'agent.request_sync: unknown device %', quote_literal(request_sync.device)
                USING ERRCODE = '22023', HINT = 'see agentctl device list --all-sites';
        END IF;
    END IF;
    IF target IS NULL THEN
        RAISE EXCEPTION 'agent.request_sync: site must not be NULL unless a device is named (its site is taken)' USING ERRCODE = '22023';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM agent.sites s WHERE s.name = target)
       AND NOT EXISTS (SELECT 1 FROM agent.devices d WHERE d.site = target) THEN
        RAISE EXCEPTION 'agent.request_sync: unknown site %', quote_literal(target)
            USING ERRCODE = '22023', HINT = 'a site is recorded by agentctl db init --site, or has devices';
    END IF;
    IF request_sync.device IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM agent.devices d WHERE d.id = request_sync.device AND d.site = target) THEN
        RAISE EXCEPTION 'agent.request_sync: no device % in site %', quote_literal(request_sync.device),
            quote_literal(target) USING ERRCODE = '22023', HINT = 'see agentctl device list';
    END IF;
    IF (SELECT count(*) FROM (SELECT 1 FROM agent.sync_runs r WHERE r.site = target AND r.finished_at IS NULL
                              LIMIT 1000) o) >= 1000 THEN
        RAISE EXCEPTION 'agent.request_sync: site % already has 1000 unfinished runs', quote_literal(target)
            USING ERRCODE = '54000', HINT = 'wait for them to finish: agentctl sync --show ID';
    END IF;
    IF label IS NOT NULL AND label <> who THEN
        who := who || ' (' || label || ')';
    END IF;
    INSERT INTO agent.sync_runs (site, kind, device, service, dry_run, requested_by)
    VALUES (target, request_sync.kind, request_sync.device, request_sync.service,
            coalesce(request_sync.dry_run, false), who)
    RETURNING id INTO run_id;
    INSERT INTO agent.sync_devices (run, device)
    SELECT DISTINCT run_id, s.device
    FROM agent.service_state s JOIN agent.devices d ON d.id = s.device
    WHERE d.site = target AND s.desired IS NOT NULL AND NOT s.desired_failed
      AND (request_sync.device IS NULL OR s.device = request_sync.device)
      AND (request_sync.service IS NULL OR s.service = request_sync.service);
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE agent.sync_runs r SET devices = n, finished_at = CASE WHEN n = 0 THEN now() END WHERE r.id = run_id;
    PERFORM pg_notify('agent_sync', CASE WHEN n = 0 THEN run_id::text ELSE 'requested' END);
    RETURN run_id;
END $$;

-- * Leadership of a site is an advisory lock on the site's key here, not on hashtext(site): a 32-bit
--   hash made site-15113 and site-59323 share one lock, and one of them never had a leader. A key is
--   given to a site the first time one of its agents asks (agent.site_key) and never changes; the
--   lock's class is new too (agent/reconcile/leader.py), so no key is mistaken for an old hash.
CREATE TABLE agent.site_keys (
    site text PRIMARY KEY CHECK (length(site) BETWEEN 1 AND 64 AND site !~ '[\x01-\x1f\x7f-\x9f]'),
    key  integer GENERATED ALWAYS AS IDENTITY UNIQUE
);

-- The key of a site, made on first use. Looked up first: a standby asks every few seconds, and an
-- insert that finds the row would still use up a number of the identity.
CREATE FUNCTION agent.site_key(site text) RETURNS integer LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    k integer := (SELECT s.key FROM agent.site_keys s WHERE s.site = site_key.site);
BEGIN
    IF k IS NULL THEN
        INSERT INTO agent.site_keys (site) VALUES (site_key.site) ON CONFLICT DO NOTHING;
        k := (SELECT s.key FROM agent.site_keys s WHERE s.site = site_key.site);
    END IF;
    RETURN k;
END $$;
