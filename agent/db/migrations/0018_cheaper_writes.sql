-- 0018: cheaper bookkeeping per command, the same promises (docs/performance.md).
-- * LISTEN agent_state from each statement's changed rows at once. A row trigger ran one PL/pgSQL
--   call per changed row of agent.service_state, and the acceptance and the report each change one
--   row per command: the call cost more than building the payload and sending it. Two statement
--   triggers (a trigger with transition tables names one event) send what the row trigger sent: one
--   notification per changed row, the same payload text, in the same transaction, and, as before,
--   nothing for rows written by another trigger (pg_trigger_depth() = 0). Within one statement the
--   updated rows' notifications now come before the inserted rows' (no two are of the same row).
-- * agent.events' index on `at` (retention by age, `agentctl events --since`) and the index on
--   archived_at of each queue's archive (PGMQ's `archived_at_idx_<queue>`, kept under its name so
--   that pgmq.create finds it) become BRIN indexes: rows are appended in time order, so a block
--   range's summary finds them as well, and an append into a range not summarised yet costs
--   nothing (a B-tree entry per event, and per archived message, did). Retention's `ORDER BY id`
--   (msg_id) reads the oldest first through the primary key.
-- * PGMQ's index on vt is dropped from the queues of agent.sites, and a partial index on their held
--   messages (`q_<queue>_held_idx`, headers->>'guard' = 'held') takes over the one thing it found for
--   the agent: the guard's held commands. Every read sets vt: with vt indexed, each read wrote a new
--   row version and an entry into each of the queue's four indexes; now it updates the row in place
--   (HOT). The agent's reads take messages in msg_id order (primary key, high_index), as PGMQ's own
--   read does; the look for the next message to become visible (min(vt), after a read came back
--   short) reads the queue whole instead. `agentctl db init` does the same for the queue it
--   initialises (after pgmq.create, which makes the vt index).
-- * Both notifications' payloads are built without json_build_object (see notify_states): the same text.
-- Expand only: agents of schema 5 to 17 keep working against it (min_agent_schema stays 5); those of
-- schema 14 to 17 look for held commands by vt, a read of the queue whole at each acceptance.
DROP TRIGGER IF EXISTS service_state_notify ON agent.service_state;

-- The payloads are the text json_build_object made, character for character, put together from
-- each value's JSON (to_json: the same escaping) at less than half its cost per row (it looks up
-- each argument's type on every call).
CREATE OR REPLACE FUNCTION agent.notify_states() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('agent_state',
        '{"device" : ' || coalesce(to_json(n.device)::text, 'null')
        || ', "service" : ' || coalesce(to_json(n.service)::text, 'null')
        || ', "desired" : ' || coalesce(to_json(n.desired)::text, 'null')
        || ', "observed" : ' || coalesce(to_json(n.observed)::text, 'null')
        || ', "version" : ' || coalesce(n.desired_version::text, 'null')
        || ', "request_id" : ' || coalesce(to_json(n.last_request_id)::text, 'null')
        || ', "error" : ' || coalesce(to_json(left(n.last_error, 200))::text, 'null') || '}')
    FROM changed_rows n;
    RETURN NULL;
END $$;
CREATE TRIGGER service_state_notify_insert AFTER INSERT ON agent.service_state
    REFERENCING NEW TABLE AS changed_rows FOR EACH STATEMENT
    WHEN (pg_trigger_depth() = 0)
    EXECUTE FUNCTION agent.notify_states();
CREATE TRIGGER service_state_notify_update AFTER UPDATE ON agent.service_state
    REFERENCING NEW TABLE AS changed_rows FOR EACH STATEMENT
    WHEN (pg_trigger_depth() = 0)
    EXECUTE FUNCTION agent.notify_states();
DROP FUNCTION IF EXISTS agent.notify_state();

-- LISTEN agent_outcome's payloads, as 0011 made them (the same text), put together the same way.
CREATE OR REPLACE FUNCTION agent.notify_outcome() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_notify('agent_outcome',
        '{"version" : ' || e.version::text
        || ', "msg_id" : ' || coalesce(e.msg_id::text, 'null')
        || ', "kind" : ' || coalesce(to_json(e.kind)::text, 'null')
        || ', "device" : ' || coalesce(to_json(left(e.device, 128))::text, 'null')
        || ', "service" : ' || coalesce(to_json(left(e.service, 200))::text, 'null')
        || ', "request_id" : ' || coalesce(to_json(left(e.request_id, 200))::text, 'null')
        || ', "error" : ' || coalesce(to_json(left(e.error, 500))::text, 'null')
        || ', "at" : ' || coalesce('"' || to_char(e.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') || '"', 'null')
        || '}')
    FROM (SELECT * FROM new_rows n WHERE n.version IS NOT NULL AND agent.final_kind(n.kind) ORDER BY n.id) e;
    RETURN NULL;
END $$;

DROP INDEX IF EXISTS agent.events_at_idx;
CREATE INDEX events_at_idx ON agent.events USING brin (at);

DO $$
DECLARE
    q text;
BEGIN
    FOR q IN SELECT s.queue FROM agent.sites s JOIN pgmq.meta m ON m.queue_name = s.queue ORDER BY s.queue LOOP
        EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON pgmq.%I (msg_id) WHERE headers->>''guard'' = ''held''',
                       'q_' || q || '_held_idx', 'q_' || q);
        EXECUTE format('DROP INDEX IF EXISTS pgmq.%I', 'q_' || q || '_vt_idx');
        IF EXISTS (SELECT 1 FROM pg_class c JOIN pg_am am ON am.oid = c.relam
                   WHERE c.oid = to_regclass(format('pgmq.%I', 'archived_at_idx_' || q)) AND am.amname <> 'brin') THEN
            EXECUTE format('DROP INDEX pgmq.%I', 'archived_at_idx_' || q);
            EXECUTE format('CREATE INDEX %I ON pgmq.%I USING brin (archived_at)', 'archived_at_idx_' || q, 'a_' || q);
        END IF;
    END LOOP;
END $$;
