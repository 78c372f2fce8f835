-- 0007: routing by site, so producers never name a queue. Expand only: an agent of schema 6 keeps
-- working against it (min_agent_schema stays 5).
-- * agent.sites records each site's queue (one queue per site, one site per queue), filled by
--   `agentctl db init [--site NAME --queue Q]` through agent.record_site.
-- * agent.enqueue without `queue` sends to the queue of the device's site (the default queue only
--   when that site has no row yet, as before); agent.request_sync without `site` takes the device's.
-- * A new event kind, `rerouted`: an agent moved a command that reached another site's queue.
CREATE TABLE agent.sites (
    -- Site names are what AGENT_SITE accepts: 1 to 64 characters, no control characters.
    name       text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 64 AND name !~ '[\x01-\x1f\x7f-\x9f]'),
    -- Queue names are what AGENT_QUEUE accepts; a DLQ is never a site's queue.
    queue      text NOT NULL UNIQUE CHECK (queue ~ '^[a-z_][a-z0-9_]{0,39}$' AND queue !~ '_dlq$'),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The old rows all satisfy the wider check: NOT VALID spares a scan of the audit log under an
-- exclusive lock (new rows are checked all the same).
ALTER TABLE agent.events DROP CONSTRAINT events_kind_check;
ALTER TABLE agent.events ADD CONSTRAINT events_kind_check CHECK (kind IN (
    'applied', 'verified', 'noop', 'refreshed', 'failed', 'retried', 'superseded', 'duplicate', 'expired',
    'dead_lettered', 'replayed', 'parked', 'drift', 'repaired', 'unreadable', 'rerouted')) NOT VALID;

-- Record site -> queue; a site has one queue and a queue one site, so a second, different pairing
-- is refused with what is recorded. Returns true when the row is new.
CREATE FUNCTION agent.record_site(site text, queue text) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    have  text;
    holder text;
    n     integer;
BEGIN
    INSERT INTO agent.sites (name, queue) VALUES (record_site.site, record_site.queue) ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n = 1 THEN
        RETURN true;
    END IF;
    SELECT s.queue INTO have FROM agent.sites s WHERE s.name = record_site.site;
    IF have IS NOT NULL AND have <> record_site.queue THEN
        RAISE EXCEPTION 'site % is recorded with queue %, not %', quote_literal(record_site.site),
            quote_literal(have), quote_literal(record_site.queue)
            USING ERRCODE = '22023', HINT = format('a site has one queue: run its agents with AGENT_QUEUE=%s '
                '(to move a site to another queue see docs/operations.md#sites)', have);
    END IF;
    SELECT s.name INTO holder FROM agent.sites s WHERE s.queue = record_site.queue AND s.name <> record_site.site;
    IF holder IS NOT NULL THEN
        RAISE EXCEPTION 'queue % is already the queue of site %', quote_literal(record_site.queue),
            quote_literal(holder)
            USING ERRCODE = '22023', HINT = format('give site %s a queue of its own: agentctl db init --site %s '
                '--queue <name>', quote_literal(record_site.site), quote_literal(record_site.site));
    END IF;
    RETURN false;
END $$;

CREATE OR REPLACE FUNCTION agent.enqueue(
    device     text,
    service    text,
    state      text DEFAULT NULL,
    request_id text DEFAULT NULL,
    not_after  timestamptz DEFAULT NULL,
    meta       jsonb DEFAULT NULL,
    action     text DEFAULT 'set',
    delay      integer DEFAULT 0,
    queue      text DEFAULT NULL
) RETURNS bigint LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- Routing: the queue named, else the queue of the device's site, else the default queue (a
    -- site `agentctl db init --site` has not recorded yet is served as before).
    q   text := coalesce(enqueue.queue,
                         (SELECT s.queue FROM agent.devices d JOIN agent.sites s ON s.name = d.site
                          WHERE d.id = enqueue.device),
                         (SELECT c.value FROM agent.config c WHERE c.key = 'default_queue'));
    msg jsonb;
BEGIN
    IF device IS NULL OR device !~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$' THEN
        RAISE EXCEPTION 'agent.enqueue: device % is not a valid device id', quote_nullable(device)
            USING ERRCODE = '22023';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM agent.devices d WHERE d.id = enqueue.device) THEN
        RAISE EXCEPTION 'agent.enqueue: unknown device %', quote_literal(device)
            USING ERRCODE = '22023', HINT = 'add it first: agentctl device add';
    END IF;
    IF service IS NULL OR service !~ '^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,199}$' THEN
        RAISE EXCEPTION 'agent.enqueue: service % is not a valid service key', quote_nullable(service)
            USING ERRCODE = '22023';
    END IF;
    IF action IS NULL OR action NOT IN ('set', 'refresh') THEN
        RAISE EXCEPTION 'agent.enqueue: action must be ''set'' or ''refresh'', got %', quote_nullable(action)
            USING ERRCODE = '22023';
    END IF;
    IF action = 'set' AND (state IS NULL OR state NOT IN ('on', 'off')) THEN
        RAISE EXCEPTION 'agent.enqueue: state must be ''on'' or ''off'', got %', quote_nullable(state)
            USING ERRCODE = '22023';
    END IF;
    IF action = 'refresh' AND state IS NOT NULL THEN
        RAISE EXCEPTION 'agent.enqueue: state must be NULL for action ''refresh''' USING ERRCODE = '22023';
    END IF;
    IF request_id IS NOT NULL AND (length(request_id) = 0 OR length(request_id) > 200) THEN
        RAISE EXCEPTION 'agent.enqueue: request_id must be 1 to 200 characters' USING ERRCODE = '22023';
    END IF;
    IF request_id ~ '[\x01-\x1f\x7f-\x9f]' THEN
        RAISE EXCEPTION 'agent.enqueue: request_id must not contain control characters' USING ERRCODE = '22023';
    END IF;
    IF not_after IS NOT NULL AND not_after <= now() THEN
        RAISE EXCEPTION 'agent.enqueue: not_after % is already past', not_after USING ERRCODE = '22023';
    END IF;
    IF meta IS NOT NULL AND jsonb_typeof(meta) <> 'object' THEN
        RAISE EXCEPTION 'agent.enqueue: meta must be a JSON object' USING ERRCODE = '22023';
    END IF;
    IF meta IS NOT NULL AND jsonb_path_exists(meta, 'strict $.** ? (@.type() == "number" && (@ > 1e308 || @ < -1e308))') THEN
        RAISE EXCEPTION 'agent.enqueue: meta holds a number too large for a double (it would become infinite)'
            USING ERRCODE = '22023';
    END IF;
    IF delay IS NULL OR delay < 0 THEN
        RAISE EXCEPTION 'agent.enqueue: delay must be >= 0 seconds' USING ERRCODE = '22023';
    END IF;
    IF q IS NULL OR q ~ '_dlq$' OR NOT EXISTS (SELECT 1 FROM pgmq.meta m WHERE m.queue_name = q)
       OR NOT EXISTS (SELECT 1 FROM pgmq.meta m WHERE m.queue_name = q || '_dlq') THEN
        RAISE EXCEPTION 'agent.enqueue: queue % does not exist', quote_nullable(q)
            USING ERRCODE = '22023', HINT = 'run: agentctl db init (--site <the device''s site>)';
    END IF;
    msg := jsonb_build_object('device', device, 'service', service);
    IF state IS NOT NULL THEN msg := msg || jsonb_build_object('state', state); END IF;
    IF action <> 'set' THEN msg := msg || jsonb_build_object('action', action); END IF;
    IF request_id IS NOT NULL THEN msg := msg || jsonb_build_object('request_id', request_id); END IF;
    IF not_after IS NOT NULL THEN
        msg := msg || jsonb_build_object('not_after',
            to_char(not_after AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'));
    END IF;
    IF meta IS NOT NULL THEN msg := msg || jsonb_build_object('meta', meta); END IF;
    IF octet_length(msg::text) > 65536 THEN
        RAISE EXCEPTION 'agent.enqueue: the message is % bytes, over the contract''s 65536-byte limit',
            octet_length(msg::text) USING ERRCODE = '22023', HINT = 'keep meta small: it is stored with every report';
    END IF;
    RETURN (SELECT pgmq.send(q, msg, delay));
END $$;

-- `site` may now be left out when a device is named: the device's site is taken (its leader runs it).
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
BEGIN
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
    IF kind NOT IN ('scheduled', 'manual') THEN
        RAISE EXCEPTION 'agent.request_sync: kind must be ''scheduled'' or ''manual''' USING ERRCODE = '22023';
    END IF;
    IF request_sync.device IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM agent.devices d WHERE d.id = request_sync.device AND d.site = target) THEN
        RAISE EXCEPTION 'agent.request_sync: no device % in site %', quote_literal(request_sync.device),
            quote_literal(target) USING ERRCODE = '22023', HINT = 'see agentctl device list';
    END IF;
    INSERT INTO agent.sync_runs (site, kind, device, service, dry_run, requested_by)
    VALUES (target, request_sync.kind, request_sync.device, request_sync.service,
            request_sync.dry_run, request_sync.requested_by)
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

-- Inventory notifications name the site whose devices changed ('' after a TRUNCATE: every site), so
-- that with many sites on one database an edit reloads only that site's agents. Agents of schema 6
-- ignore the payload and reload as before.
CREATE OR REPLACE FUNCTION agent.notify_inventory() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM pg_notify('agent_inventory', s.site) FROM (SELECT DISTINCT site FROM new_rows) s;
    ELSIF TG_OP = 'UPDATE' THEN
        PERFORM pg_notify('agent_inventory', s.site)
        FROM (SELECT site FROM new_rows UNION SELECT site FROM old_rows) s;
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('agent_inventory', s.site) FROM (SELECT DISTINCT site FROM old_rows) s;
    ELSE
        PERFORM pg_notify('agent_inventory', '');
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER devices_notify ON agent.devices;
CREATE TRIGGER devices_notify_insert AFTER INSERT ON agent.devices
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION agent.notify_inventory();
CREATE TRIGGER devices_notify_update AFTER UPDATE ON agent.devices
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION agent.notify_inventory();
CREATE TRIGGER devices_notify_delete AFTER DELETE ON agent.devices
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION agent.notify_inventory();
CREATE TRIGGER devices_notify_truncate AFTER TRUNCATE ON agent.devices
    FOR EACH STATEMENT EXECUTE FUNCTION agent.notify_inventory();
