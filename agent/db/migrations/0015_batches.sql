-- 0015: restores first, and batches a billing job can follow. Expand only: agents of schema 5 to 14
-- keep working against it (min_agent_schema stays 5); the batch bookkeeping is the database's own.
-- * agent.enqueue takes `priority` ('high' or 'normal'; default 'high' for a restore, state 'on',
--   'normal' for the rest) and `batch` (a name of the producer's choosing). Both travel in the
--   message's headers, {"priority": ..., "batch": ...}; the agent reads the priority from there.
--   The old signature is dropped: calls without the new arguments keep working.
-- * agent.batches / agent.batch_commands: the commands of each batch by version (the msg_id
--   agent.enqueue returned, kept when a command is moved to its site's queue or replayed from the
--   DLQ), written by agent.enqueue, each with its outcome: NULL while pending, `held`, or the final
--   kind of its latest event (a trigger on agent.events keeps it, whichever agent records the event).
-- * agent.batch_status(name): one row of counts; LISTEN agent_batch: a JSON payload each time a
--   command of a batch is settled or held and none of the batch is pending any more.
-- * agent.prune_audit('batches', ...): batches go with the events, by the same retention (the
--   function as 0012 left it, with a case for batches).
CREATE TABLE agent.batches (
    name             text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9._:-]{1,100}$'),
    first_enqueued_at timestamptz NOT NULL DEFAULT now(),
    last_settled_at  timestamptz
);

CREATE TABLE agent.batch_commands (
    version     bigint PRIMARY KEY,
    batch       text NOT NULL REFERENCES agent.batches (name),
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    outcome     text,          -- NULL: pending; 'held'; else the final kind of its latest event
    settled_at  timestamptz
);
CREATE INDEX batch_commands_batch_idx ON agent.batch_commands (batch, enqueued_at);
CREATE INDEX batch_commands_pending_idx ON agent.batch_commands (batch) WHERE outcome IS NULL;

-- What the latest event of a command makes of it in its batch: settled (the final kind; `discarded`,
-- the guard's operator decision, is final whether or not final_kind lists it yet), held, or pending.
CREATE FUNCTION agent.batch_outcome(kind text) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN agent.final_kind(kind) OR kind = 'discarded' THEN kind WHEN kind = 'held' THEN 'held' END
$$;

-- One row: how many commands the batch has and where each is. `verified` counts `refreshed` too (a
-- refresh's success), `failed` the dead-lettered. No row for a batch never enqueued (or pruned).
CREATE FUNCTION agent.batch_status(name text)
RETURNS TABLE (batch text, total bigint, verified bigint, superseded bigint, failed bigint, held bigint,
               discarded bigint, duplicate bigint, expired bigint, pending bigint,
               first_enqueued_at timestamptz, last_settled_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT b.name, count(c.version),
           count(*) FILTER (WHERE c.outcome IN ('verified', 'refreshed')),
           count(*) FILTER (WHERE c.outcome = 'superseded'),
           count(*) FILTER (WHERE c.outcome = 'dead_lettered'),
           count(*) FILTER (WHERE c.outcome = 'held'),
           count(*) FILTER (WHERE c.outcome = 'discarded'),
           count(*) FILTER (WHERE c.outcome = 'duplicate'),
           count(*) FILTER (WHERE c.outcome = 'expired'),
           count(*) FILTER (WHERE c.version IS NOT NULL AND c.outcome IS NULL),
           b.first_enqueued_at, b.last_settled_at
    FROM agent.batches b LEFT JOIN agent.batch_commands c ON c.batch = b.name
    WHERE b.name = batch_status.name
    GROUP BY b.name, b.first_enqueued_at, b.last_settled_at
$$;

-- Keeps each batched command's outcome from its latest event (a statement's events of one command
-- come in order: the last one counts), and tells LISTEN agent_batch when a command's settling or
-- holding leaves its batch with nothing pending. The batch's row is locked before that check, so of
-- two transactions settling a batch's last two commands the second sees the first's and notifies.
-- Commands without a batch cost a probe of batch_commands' primary key per event.
CREATE FUNCTION agent.track_batches() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
    s record;
BEGIN
    FOR r IN
        WITH latest AS (
            SELECT DISTINCT ON (n.version) n.version, n.at, agent.batch_outcome(n.kind) AS outcome
            FROM new_rows n JOIN agent.batch_commands c ON c.version = n.version
            ORDER BY n.version, n.id DESC),
        changed AS (
            UPDATE agent.batch_commands c
            SET outcome = l.outcome, settled_at = CASE WHEN l.outcome <> 'held' THEN l.at END
            FROM latest l
            WHERE c.version = l.version AND c.outcome IS DISTINCT FROM l.outcome
            RETURNING c.batch, l.outcome, l.at)
        SELECT ch.batch, max(ch.at) FILTER (WHERE ch.outcome <> 'held') AS settled_at
        FROM changed ch WHERE ch.outcome IS NOT NULL
        GROUP BY ch.batch ORDER BY ch.batch
    LOOP
        UPDATE agent.batches b SET last_settled_at = greatest(b.last_settled_at, r.settled_at)
        WHERE b.name = r.batch;
        IF NOT EXISTS (SELECT 1 FROM agent.batch_commands c WHERE c.batch = r.batch AND c.outcome IS NULL) THEN
            SELECT * INTO s FROM agent.batch_status(r.batch);
            PERFORM pg_notify('agent_batch', json_build_object(
                'batch', s.batch, 'total', s.total, 'verified', s.verified, 'superseded', s.superseded,
                'failed', s.failed, 'held', s.held, 'discarded', s.discarded, 'duplicate', s.duplicate,
                'expired', s.expired, 'pending', s.pending,
                'first_enqueued_at', to_char(s.first_enqueued_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                'last_settled_at', to_char(s.last_settled_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
            )::text);
        END IF;
    END LOOP;
    RETURN NULL;
END $$;
CREATE TRIGGER events_batches AFTER INSERT ON agent.events REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION agent.track_batches();

DROP FUNCTION agent.enqueue(text, text, text, text, timestamptz, jsonb, text, integer, text);

-- Errors by what the producer should do (contract.md, "Errors"): 22023 the call is wrong (fix it),
-- P0002 the device is unknown (drop the command, or add the device first), 55000 the queue of the
-- device's site is missing (an operator runs `agentctl db init --site`; retry later). New in 0015:
-- `priority` and `batch`, validated (22023), sent as the message's headers, and the batch's command
-- recorded in the same transaction. The rest as in 0011.
CREATE FUNCTION agent.enqueue(
    device     text,
    service    text,
    state      text DEFAULT NULL,
    request_id text DEFAULT NULL,
    not_after  timestamptz DEFAULT NULL,
    meta       jsonb DEFAULT NULL,
    action     text DEFAULT 'set',
    delay      integer DEFAULT 0,
    queue      text DEFAULT NULL,
    priority   text DEFAULT NULL,
    batch      text DEFAULT NULL
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
    hdr jsonb;
    new_id bigint;
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
    -- a restore goes first unless the producer says otherwise
    priority := coalesce(priority, CASE WHEN action = 'set' AND state = 'on' THEN 'high' ELSE 'normal' END);
    IF priority NOT IN ('high', 'normal') THEN
        RAISE EXCEPTION 'agent.enqueue: priority must be ''high'' or ''normal'', got %', quote_literal(priority)
            USING ERRCODE = '22023';
    END IF;
    IF batch IS NOT NULL AND batch !~ '^[A-Za-z0-9._:-]{1,100}$' THEN
        RAISE EXCEPTION 'agent.enqueue: batch % is not a valid batch name (1 to 100 of A-Z a-z 0-9 . _ : -)',
            quote_literal(left(batch, 120)) USING ERRCODE = '22023';
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
    hdr := jsonb_build_object('priority', priority);
    IF batch IS NOT NULL THEN hdr := hdr || jsonb_build_object('batch', batch); END IF;
    new_id := (SELECT pgmq.send(q, msg, hdr, delay));
    IF batch IS NOT NULL THEN
        INSERT INTO agent.batches (name) VALUES (batch) ON CONFLICT DO NOTHING;
        INSERT INTO agent.batch_commands (version, batch) VALUES (new_id, batch);
    END IF;
    RETURN new_id;
END $$;

-- Retention: `batches` removes the commands of batches with nothing enqueued or settled since
-- `cutoff` (the events' cutoff: a batch goes with its events), one batch of rows at a time, and then
-- such batches left empty. The rest as in 0006.
CREATE OR REPLACE FUNCTION agent.prune_audit(what text, cutoff timestamptz, batch integer, dry boolean DEFAULT false)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    IF cutoff IS NULL OR cutoff > now() - interval '1 day' THEN
        RAISE EXCEPTION 'agent.prune_audit: refusing to remove rows younger than a day' USING ERRCODE = '22023';
    END IF;
    IF what = 'events' THEN
        IF dry THEN
            SELECT count(*) INTO n FROM agent.events WHERE at < cutoff;
            RETURN n;
        END IF;
        DELETE FROM agent.events WHERE id IN (
            SELECT id FROM agent.events WHERE at < cutoff ORDER BY id LIMIT batch);
    ELSIF what = 'requests' THEN
        IF dry THEN
            SELECT count(*) INTO n FROM agent.requests WHERE seen_at < cutoff;
            RETURN n;
        END IF;
        DELETE FROM agent.requests WHERE request_id IN (
            SELECT request_id FROM agent.requests WHERE seen_at < cutoff ORDER BY seen_at LIMIT batch);
    ELSIF what = 'agents' THEN
        IF dry THEN
            SELECT count(*) INTO n FROM agent.agents WHERE last_heartbeat < cutoff;
            RETURN n;
        END IF;
        DELETE FROM agent.agents WHERE agent_id IN (
            SELECT agent_id FROM agent.agents WHERE last_heartbeat < cutoff ORDER BY last_heartbeat LIMIT batch);
    ELSIF what = 'batches' THEN
        IF dry THEN
            SELECT count(*) INTO n FROM agent.batches b JOIN agent.batch_commands c ON c.batch = b.name
            WHERE coalesce(b.last_settled_at, b.first_enqueued_at) < cutoff
              AND NOT EXISTS (SELECT 1 FROM agent.batch_commands y WHERE y.batch = b.name AND y.enqueued_at >= cutoff);
            RETURN n;
        END IF;
        DELETE FROM agent.batch_commands WHERE version IN (
            SELECT c.version FROM agent.batches b JOIN agent.batch_commands c ON c.batch = b.name
            WHERE coalesce(b.last_settled_at, b.first_enqueued_at) < cutoff
              AND NOT EXISTS (SELECT 1 FROM agent.batch_commands y WHERE y.batch = b.name AND y.enqueued_at >= cutoff)
            LIMIT prune_audit.batch);
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n < prune_audit.batch THEN  -- the last of them: the batches left empty go too
            DELETE FROM agent.batches b
            WHERE coalesce(b.last_settled_at, b.first_enqueued_at) < cutoff
              AND NOT EXISTS (SELECT 1 FROM agent.batch_commands c WHERE c.batch = b.name);
        END IF;
        RETURN n;
    ELSE
        RAISE EXCEPTION 'agent.prune_audit: what must be events, requests, agents or batches' USING ERRCODE = '22023';
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- The producer may follow its batches.
REVOKE ALL ON FUNCTION agent.batch_status(text), agent.batch_outcome(text) FROM PUBLIC;
