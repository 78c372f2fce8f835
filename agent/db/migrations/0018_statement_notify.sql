-- 0018: cheaper bookkeeping per command, the same promises (docs/performance.md).
-- * LISTEN agent_state from each statement's changed rows at once. A row trigger ran one PL/pgSQL
--   call per changed row of agent.service_state, and the acceptance and the report each change one
--   row per command: the call cost more than building the payload and sending it. Two statement
--   triggers (a trigger with transition tables names one event) send what the row trigger sent: one
--   notification per changed row, the same payload text, in the same transaction, and, as before,
--   nothing for rows written by another trigger (pg_trigger_depth() = 0). Within one statement the
--   updated rows' notifications now come before the inserted rows' (no two are of the same row).
-- * agent.events' index on `at` (retention by age, `agentctl events --since`) becomes a BRIN index:
--   events are appended in time order, so a block range's summary finds them as well, and an append
--   into a range not summarised yet costs nothing (a B-tree entry per event did). Retention's
--   `ORDER BY id` reads the oldest first through the primary key.
-- Expand only: agents of schema 5 to 17 keep working against it (min_agent_schema stays 5).
DROP TRIGGER IF EXISTS service_state_notify ON agent.service_state;

CREATE OR REPLACE FUNCTION agent.notify_states() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('agent_state', json_build_object(
        'device', n.device, 'service', n.service, 'desired', n.desired,
        'observed', n.observed, 'version', n.desired_version,
        'request_id', n.last_request_id, 'error', left(n.last_error, 200))::text)
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

DROP INDEX IF EXISTS agent.events_at_idx;
CREATE INDEX events_at_idx ON agent.events USING brin (at);
