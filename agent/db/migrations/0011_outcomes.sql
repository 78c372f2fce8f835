-- 0011: a producer can follow one command to its end. Expand only: agents of schema 5 to 10 keep
-- working against it (min_agent_schema stays 5), and send the new notification too.
-- * agent.final_kind(kind): the event kinds that settle a command, in one place.
-- * LISTEN agent_outcome: one JSON payload per settled command, sent by a trigger on agent.events in
--   the transaction that records the outcome (whichever agent, of whichever schema, records it).
-- * agent.command_status(msg_id): queued, parked, retrying, held or settled (with the final kind).
-- * agent.enqueue answers by what the producer should do: 22023 fix the call, P0002 drop the
--   command (unknown device), 55000 retry later (the queue of the device's site is missing: an
--   operator's `agentctl db init --site` is due).
-- * An index on agent.events (version): a command's events whatever queue and msg_id they came from.
--   Building it holds the agents' report writes back for as long as it takes (seconds for millions
--   of events): they wait and retry, nothing is lost.
CREATE INDEX events_version_idx ON agent.events (version, id) WHERE version IS NOT NULL;

-- The kinds after which nothing more happens to a command (unless an operator replays a dead
-- letter: its version then comes back to a queue). A feature that adds a final kind redefines this.
CREATE FUNCTION agent.final_kind(kind text) RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT kind IN ('verified', 'refreshed', 'superseded', 'duplicate', 'expired', 'dead_lettered')
$$;

-- One notification per final event of a command (reconcile messages' events carry no version).
-- Every text is bounded, so a payload stays far below NOTIFY's 8000 bytes (at most 6 bytes a
-- character once escaped for JSON): a refused NOTIFY would undo the report. With the owner's
-- rights, so any role that may record events may call final_kind through it.
CREATE FUNCTION agent.notify_outcome() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_notify('agent_outcome', json_build_object(
        'version', e.version, 'msg_id', e.msg_id, 'kind', e.kind, 'device', left(e.device, 128),
        'service', left(e.service, 200), 'request_id', left(e.request_id, 200), 'error', left(e.error, 500),
        'at', to_char(e.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))::text)
    FROM (SELECT * FROM new_rows n WHERE n.version IS NOT NULL AND agent.final_kind(n.kind) ORDER BY n.id) e;
    RETURN NULL;
END $$;
CREATE TRIGGER events_outcome AFTER INSERT ON agent.events REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION agent.notify_outcome();

-- Where the command of version `msg_id` (what agent.enqueue returned; the msg_id of a moved or
-- replayed copy of it is taken too) is, in one snapshot:
-- * in an agent queue: `queued` (waiting, or being worked on), `parked` (its device unreachable or
--   paused: `error` says why), `retrying` (an attempt failed: `error`), `held` (an event `held`);
-- * settled: its latest final event (`kind`, `error`, `at`); a dead letter still in a DLQ gives its
--   `dlq_id` there (what `agentctl dlq replay` takes);
-- * `unknown`: no such command, not committed yet, or its events were pruned by retention.
-- A command's version stays when it is moved to its site's queue or replayed from the DLQ; its
-- msg_id there is new (`last_msg_id`). Read-only, with the owner's rights: producers have no PGMQ access.
CREATE FUNCTION agent.command_status(msg_id bigint)
RETURNS TABLE (status text, kind text, error text, at timestamptz, version bigint, last_msg_id bigint,
               queue text, dlq_id bigint, attempt integer, visible_at timestamptz, device text, service text,
               request_id text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    arg     bigint := command_status.msg_id;
    v       bigint;
    q       text;
    e       agent.events%ROWTYPE;  -- its latest event
    f       agent.events%ROWTYPE;  -- its latest final event
    -- its message in an agent queue, if it is in one
    m_id    bigint;
    m_vt    timestamptz;
    m_at    timestamptz;
    m_body  jsonb;
    m_ver   bigint;
    m_queue text;
    -- a message's version, as the agent reads it (agent/executor/policy.py: parse_headers)
    pick    text := 'SELECT msg_id, vt, enqueued_at, message, CASE WHEN jsonb_typeof(headers) = ''object'' '
                    'AND jsonb_typeof(headers->''origin_msg_id'') = ''number'' AND (headers->>''origin_msg_id'') '
                    '~ ''^[0-9]+$'' AND (headers->>''origin_msg_id'')::numeric BETWEEN 1 AND msg_id '
                    'THEN (headers->>''origin_msg_id'')::bigint ELSE msg_id END AS version FROM pgmq.%I ';
BEGIN
    IF arg IS NULL THEN
        RAISE EXCEPTION 'agent.command_status: msg_id must not be NULL' USING ERRCODE = '22023';
    END IF;
    v := (SELECT ev.version FROM agent.events ev WHERE ev.msg_id = arg AND ev.version IS NOT NULL
          ORDER BY ev.id DESC LIMIT 1);
    -- the agent queues: those with a DLQ beside them
    FOR q IN SELECT a.queue_name FROM pgmq.meta a WHERE a.queue_name !~ '_dlq$'
               AND EXISTS (SELECT 1 FROM pgmq.meta d WHERE d.queue_name = a.queue_name || '_dlq')
             ORDER BY a.queue_name LOOP
        EXECUTE format(pick || 'WHERE msg_id = $1', 'q_' || q) INTO m_id, m_vt, m_at, m_body, m_ver USING arg;
        IF m_id IS NOT NULL THEN
            m_queue := q;
            EXIT;
        END IF;
    END LOOP;
    v := coalesce(v, m_ver, arg);
    IF m_ver IS DISTINCT FROM v THEN
        m_id := NULL;
    END IF;
    SELECT ev.* INTO e FROM agent.events ev WHERE ev.version = v ORDER BY ev.id DESC LIMIT 1;
    -- moved or replayed: a copy with a new msg_id carries the version in its headers
    IF m_id IS NULL AND (v <> arg OR e.kind IN ('rerouted', 'dead_lettered', 'replayed')) THEN
        FOR q IN SELECT a.queue_name FROM pgmq.meta a WHERE a.queue_name !~ '_dlq$'
                   AND EXISTS (SELECT 1 FROM pgmq.meta d WHERE d.queue_name = a.queue_name || '_dlq')
                 ORDER BY a.queue_name LOOP
            EXECUTE format(pick || 'WHERE headers->>''origin_msg_id'' = $1::text AND ($2::text IS NULL '
                           'OR message->>''device'' = $2) ORDER BY 1 DESC LIMIT 1', 'q_' || q)
                INTO m_id, m_vt, m_at, m_body, m_ver USING v, e.device;
            IF m_id IS NOT NULL AND m_ver = v THEN
                m_queue := q;
                EXIT;
            END IF;
            m_id := NULL;
        END LOOP;
    END IF;
    version := v;
    IF m_id IS NOT NULL THEN
        status := CASE WHEN e.kind = 'parked' THEN 'parked' WHEN e.kind = 'held' THEN 'held'
                       WHEN e.kind IN ('failed', 'retried', 'applied') THEN 'retrying' ELSE 'queued' END;
        kind := CASE WHEN status <> 'queued' THEN e.kind END;
        error := CASE WHEN status = 'retrying'
                      THEN (SELECT ev.error FROM agent.events ev WHERE ev.version = v AND ev.kind = 'failed'
                            ORDER BY ev.id DESC LIMIT 1)
                      WHEN status <> 'queued' THEN e.error END;
        at := CASE WHEN status = 'queued' THEN m_at ELSE e.at END;
        last_msg_id := m_id;
        queue := m_queue;
        attempt := e.attempt;
        visible_at := m_vt;
        device := left(m_body->>'device', 128);
        service := left(m_body->>'service', 200);
        request_id := left(m_body->>'request_id', 200);
        RETURN NEXT;
        RETURN;
    END IF;
    SELECT ev.* INTO f FROM agent.events ev WHERE ev.version = v AND agent.final_kind(ev.kind)
    ORDER BY ev.id DESC LIMIT 1;
    IF f.id IS NULL THEN
        status := 'unknown';
        kind := e.kind;
        RETURN NEXT;
        RETURN;
    END IF;
    status := 'settled';
    kind := f.kind;
    error := f.error;
    at := f.at;
    last_msg_id := f.msg_id;
    attempt := f.attempt;
    device := f.device;
    service := f.service;
    request_id := f.request_id;
    IF f.kind = 'dead_lettered' THEN
        FOR q IN SELECT a.queue_name FROM pgmq.meta a WHERE a.queue_name ~ '_dlq$' ORDER BY a.queue_name LOOP
            EXECUTE format('SELECT msg_id FROM pgmq.%I WHERE jsonb_typeof(headers) = ''object'' AND '
                           'headers->>''origin_msg_id'' = $1::text ORDER BY msg_id DESC LIMIT 1', 'q_' || q)
                INTO dlq_id USING v;
            IF dlq_id IS NOT NULL THEN
                queue := q;
                EXIT;
            END IF;
        END LOOP;
    END IF;
    RETURN NEXT;
END $$;

-- Errors by what the producer should do (contract.md, "Errors"): 22023 the call is wrong (fix it),
-- P0002 the device is unknown (drop the command, or add the device first), 55000 the queue of the
-- device's site is missing (an operator runs `agentctl db init --site`; retry later). The rest as in 0007.
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
            USING ERRCODE = 'P0002', HINT = 'add it first: agentctl device add';
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
        IF enqueue.queue IS NOT NULL THEN  -- the producer named it
            RAISE EXCEPTION 'agent.enqueue: queue % does not exist', quote_nullable(q)
                USING ERRCODE = '22023', HINT = 'leave queue out: the queue of the device''s site is taken';
        END IF;
        RAISE EXCEPTION 'agent.enqueue: queue % of the device''s site does not exist', quote_nullable(q)
            USING ERRCODE = '55000', HINT = format('an operator runs: agentctl db init --site %s; send it again then',
                (SELECT d.site FROM agent.devices d WHERE d.id = enqueue.device));
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
