-- 0009: a worker role per site, so that a compromised edge agent controls its own site and no other.
-- Expand only: agents of schema 5 to 8 keep working (min_agent_schema stays 5), and so does the
-- all-sites `agent_worker` role; the owner and superusers are not subject to row-level security.
-- * `agentctl db init --site S` creates agent_worker_<S> (agent/db/schema.py, worker_role): its
--   site's queue and DLQ, and the state and device claims of its site's devices only, enforced by
--   one restrictive row-level security policy per site role on the two tables (created there too).
--   The policy `agent_all` keeps every other role's access exactly what its grants say.
-- * A command that reached another site's queue is moved by agent.move_message, which runs with
--   its owner's rights: a site's role may send to no queue but its own.

ALTER TABLE agent.service_state ENABLE ROW LEVEL SECURITY;
ALTER TABLE agent.device_claims ENABLE ROW LEVEL SECURITY;
CREATE POLICY agent_all ON agent.service_state AS PERMISSIVE FOR ALL TO PUBLIC USING (true) WITH CHECK (true);
CREATE POLICY agent_all ON agent.device_claims AS PERMISSIVE FOR ALL TO PUBLIC USING (true) WITH CHECK (true);

-- Move message `id` (fenced by its read_ct `rc`) from queue `src` to queue `dest`, which must be the
-- queue recorded for the site of the message's device, and not `src`. The caller must be allowed to
-- take messages from `src` (DELETE on its table): it cannot move another site's messages. The copy
-- keeps the body, the headers and its version (`origin_msg_id`; its `bounces` in `src` stay behind),
-- and is marked `rerouted_from`, so it is never moved twice.
-- With `archive` the original is kept in the archive of `src`. Returns the new msg_id, or NULL when
-- nothing was moved: the message was taken by another reader since, or its device is no longer of
-- the site of `dest` (it stays, and comes back to be routed anew once its lease ends).
CREATE FUNCTION agent.move_message(src text, id bigint, rc integer, dest text, archive boolean DEFAULT true)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- who called: the role set with SET ROLE, else the session's (inside this function
    -- current_user is the owner)
    caller text := coalesce(nullif(current_setting('role'), 'none'), session_user);
    m      record;
    target text;
    n      integer;
    version bigint;
BEGIN
    IF src IS NULL OR src ~ '_dlq$' OR NOT EXISTS (SELECT 1 FROM pgmq.meta q WHERE q.queue_name = src) THEN
        RAISE EXCEPTION 'agent.move_message: % is not an agent queue', quote_nullable(src) USING ERRCODE = '22023';
    END IF;
    IF NOT has_table_privilege(caller, format('pgmq.%I', 'q_' || src), 'DELETE') THEN
        RAISE EXCEPTION 'agent.move_message: role % may not take messages from queue %', quote_ident(caller),
            quote_literal(src) USING ERRCODE = '42501';
    END IF;
    EXECUTE format('SELECT msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers FROM pgmq.%I '
                   'WHERE msg_id = $1 AND read_ct = $2 FOR UPDATE', 'q_' || src) INTO m USING id, rc;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n = 0 THEN
        RETURN NULL;
    END IF;
    SELECT s.queue INTO target FROM agent.devices d JOIN agent.sites s ON s.name = d.site
    WHERE d.id = m.message->>'device';
    IF target IS NULL OR target IS DISTINCT FROM dest OR dest = src
       OR NOT EXISTS (SELECT 1 FROM pgmq.meta q WHERE q.queue_name = dest) THEN
        RETURN NULL;
    END IF;
    EXECUTE format('DELETE FROM pgmq.%I WHERE msg_id = $1', 'q_' || src) USING id;
    IF archive THEN
        EXECUTE format('INSERT INTO pgmq.%I (msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers) '
                       'VALUES ($1, $2, $3, $4, $5, $6, $7)', 'a_' || src)
            USING m.msg_id, m.vt, m.read_ct, m.enqueued_at, m.last_read_at, m.message, m.headers;
    END IF;
    -- the command's version, as the agent reads it (agent/executor/policy.py: parse_headers): a valid
    -- origin_msg_id, else its msg_id here; every agent queue takes its ids from one sequence (0008)
    version := CASE WHEN jsonb_typeof(m.headers) = 'object' AND jsonb_typeof(m.headers->'origin_msg_id') = 'number'
                         AND (m.headers->>'origin_msg_id') ~ '^[0-9]+$'
                         AND (m.headers->>'origin_msg_id')::numeric BETWEEN 1 AND m.msg_id
                    THEN (m.headers->>'origin_msg_id')::bigint ELSE m.msg_id END;
    RETURN (SELECT pgmq.send(dest, m.message,
        (CASE WHEN jsonb_typeof(m.headers) = 'object' THEN m.headers ELSE '{}'::jsonb END - 'origin_msg_id' - 'bounces')
        || jsonb_build_object('origin_msg_id', version, 'rerouted_from', jsonb_build_object(
               'queue', src, 'site', (SELECT s.name FROM agent.sites s WHERE s.queue = src), 'msg_id', id))));
END $$;
REVOKE ALL ON FUNCTION agent.move_message(text, bigint, integer, text, boolean) FROM PUBLIC;
