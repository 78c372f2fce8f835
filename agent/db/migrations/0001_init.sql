-- 0001: inventory, desired/observed state, audit log, idempotency keys, producer API.
CREATE SCHEMA IF NOT EXISTS agent;

CREATE TABLE agent.config (
    key   text PRIMARY KEY,
    value text NOT NULL
);

CREATE TABLE agent.devices (
    id         text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$'),
    driver     text NOT NULL,
    address    text,
    site       text NOT NULL DEFAULT 'default',
    options    jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(options) = 'object'),
    credential text,   -- name of a credential on the agent host; never the secret itself
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devices_site_idx ON agent.devices (site);

CREATE TABLE agent.service_state (
    device          text NOT NULL,
    service         text NOT NULL,
    desired         text CHECK (desired IN ('on', 'off')),
    desired_version bigint NOT NULL DEFAULT 0,   -- msg_id of the command that set desired
    desired_at      timestamptz,
    observed        text NOT NULL DEFAULT 'unknown' CHECK (observed IN ('on', 'off', 'unknown')),
    observed_at     timestamptz,
    applied_at      timestamptz,                 -- last write the device answered OK
    verified_at     timestamptz,                 -- last read-back that matched desired
    last_error      text,
    last_error_at   timestamptz,
    last_msg_id     bigint,
    last_request_id text,
    meta            jsonb,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device, service)
);

CREATE TABLE agent.events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    device      text,
    service     text,
    kind        text NOT NULL CHECK (kind IN (
                    'applied', 'verified', 'noop', 'refreshed', 'failed', 'retried',
                    'superseded', 'duplicate', 'expired', 'dead_lettered', 'replayed')),
    msg_id      bigint,
    version     bigint,
    request_id  text,
    desired     text,
    observed    text,
    attempt     integer,
    duration_ms double precision,
    error       text,
    agent_id    text,
    meta        jsonb
);
CREATE INDEX events_device_idx ON agent.events (device, service, id);
CREATE INDEX events_msg_idx ON agent.events (msg_id);
CREATE INDEX events_request_idx ON agent.events (request_id) WHERE request_id IS NOT NULL;

CREATE FUNCTION agent.events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'agent.events is append-only';
END $$;
CREATE TRIGGER events_append_only BEFORE UPDATE ON agent.events
    FOR EACH ROW EXECUTE FUNCTION agent.events_append_only();

-- request_id -> the command (origin msg_id) that first carried it
CREATE TABLE agent.requests (
    request_id text PRIMARY KEY,
    version    bigint NOT NULL,
    device     text NOT NULL,
    service    text NOT NULL,
    seen_at    timestamptz NOT NULL DEFAULT now()
);

-- Producers and agents LISTEN here: a JSON payload per changed (device, service).
CREATE FUNCTION agent.notify_state() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('agent_state', json_build_object(
        'device', NEW.device, 'service', NEW.service, 'desired', NEW.desired,
        'observed', NEW.observed, 'version', NEW.desired_version,
        'request_id', NEW.last_request_id, 'error', left(NEW.last_error, 200))::text);
    RETURN NULL;
END $$;
CREATE TRIGGER service_state_notify AFTER INSERT OR UPDATE ON agent.service_state
    FOR EACH ROW
    WHEN (pg_trigger_depth() = 0)
    EXECUTE FUNCTION agent.notify_state();

-- The daemon reloads its inventory when this fires.
CREATE FUNCTION agent.notify_inventory() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('agent_inventory', '');
    RETURN NULL;
END $$;
CREATE TRIGGER devices_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON agent.devices
    FOR EACH STATEMENT EXECUTE FUNCTION agent.notify_inventory();

-- Producer API: validate, then pgmq.send. A bad argument is a clear SQL error at enqueue time.
CREATE FUNCTION agent.enqueue(
    device     text,
    service    text,
    state      text DEFAULT NULL,
    request_id text DEFAULT NULL,
    not_after  timestamptz DEFAULT NULL,
    meta       jsonb DEFAULT NULL,
    action     text DEFAULT 'set',
    delay      integer DEFAULT 0,
    queue      text DEFAULT NULL
) RETURNS bigint LANGUAGE plpgsql AS $$
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
    IF not_after IS NOT NULL AND not_after <= now() THEN
        RAISE EXCEPTION 'agent.enqueue: not_after % is already past', not_after USING ERRCODE = '22023';
    END IF;
    IF meta IS NOT NULL AND jsonb_typeof(meta) <> 'object' THEN
        RAISE EXCEPTION 'agent.enqueue: meta must be a JSON object' USING ERRCODE = '22023';
    END IF;
    IF delay IS NULL OR delay < 0 THEN
        RAISE EXCEPTION 'agent.enqueue: delay must be >= 0 seconds' USING ERRCODE = '22023';
    END IF;
    IF q IS NULL OR NOT EXISTS (SELECT 1 FROM pgmq.meta m WHERE m.queue_name = q) THEN
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
    RETURN (SELECT pgmq.send(q, msg, delay));
END $$;
