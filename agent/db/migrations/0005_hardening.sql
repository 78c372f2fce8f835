-- 0005: hardening.
-- * A key whose newest command was dead-lettered is marked, so reconciliation never applies a
--   command the producer was told had failed; a newer command or a replay clears the mark.
-- * Device claims are leases in a table (expiry longer than any device operation), not session
--   locks that vanish with a connection while an operation is still running.
-- * The producer API runs with its owner's rights (SECURITY DEFINER, fixed search_path), so
--   producers need no access to PGMQ at all (roles: see agent/db/roles.sql, applied by db init).
-- * agent.enqueue refuses non-finite numbers, control characters in request_id, and messages over
--   the contract's size limit, and only sends to agent queues.
ALTER TABLE agent.service_state ADD COLUMN desired_failed boolean NOT NULL DEFAULT false;

CREATE TABLE agent.device_claims (
    device     text PRIMARY KEY,
    agent_id   text NOT NULL,
    host       text,            -- where the holder runs: on the same host a dead holder is seen at once
    pid        integer,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX device_claims_agent_idx ON agent.device_claims (agent_id);

-- Re-enable PGMQ's insert notifications when a crash emptied their UNLOGGED throttle table.
-- Runs with the owner's rights: the trigger lives on the queue table, which agents do not own.
CREATE OR REPLACE FUNCTION agent.ensure_notify(queue text, throttle_ms integer) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgmq.meta m WHERE m.queue_name = queue) THEN
        RAISE EXCEPTION 'agent.ensure_notify: queue % does not exist', quote_nullable(queue) USING ERRCODE = '22023';
    END IF;
    IF EXISTS (SELECT 1 FROM pgmq.notify_insert_throttle t WHERE t.queue_name = queue)
       AND EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'trigger_notify_queue_insert_listeners'
                   AND tgrelid = to_regclass(format('pgmq.%I', 'q_' || queue))) THEN
        RETURN false;
    END IF;
    PERFORM pgmq.acquire_queue_lock(queue);
    IF EXISTS (SELECT 1 FROM pgmq.notify_insert_throttle t WHERE t.queue_name = queue)
       AND EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'trigger_notify_queue_insert_listeners'
                   AND tgrelid = to_regclass(format('pgmq.%I', 'q_' || queue))) THEN
        RETURN false;
    END IF;
    PERFORM pgmq.enable_notify_insert(queue, throttle_ms);
    RETURN true;
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
    q   text := coalesce(queue, (SELECT value FROM agent.config WHERE key = 'default_queue'));
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
            USING ERRCODE = '22023', HINT = 'run: agentctl db init';
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

CREATE OR REPLACE FUNCTION agent.request_sync(
    site      text,
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
    WHERE d.site = request_sync.site AND s.desired IS NOT NULL AND NOT s.desired_failed
      AND (request_sync.device IS NULL OR s.device = request_sync.device)
      AND (request_sync.service IS NULL OR s.service = request_sync.service);
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE agent.sync_runs r SET devices = n, finished_at = CASE WHEN n = 0 THEN now() END WHERE r.id = run_id;
    PERFORM pg_notify('agent_sync', CASE WHEN n = 0 THEN run_id::text ELSE 'requested' END);
    RETURN run_id;
END $$;
