-- 0012: what grows is cleaned, and what is cleaned is recorded. Expand only: agents of schema 5 to
-- 11 keep working against it (min_agent_schema stays 5).
-- * agent.agents.schema: the schema version an agent was built for, recorded when it registers
--   (`agentctl db status` lists each agent's version and schema). NULL: an agent before schema 12.
-- * Agents that stopped or went silent are pruned after AGENT_RETAIN_AGENTS_DAYS by the site's
--   leader, through agent.prune_audit('agents', ...) (an agent may not delete rows of agent.agents).
-- * agent.forget(device, service): a producer (or `agentctl service forget`) retires a service key
--   (a churned customer): its state row goes, so reconciliation stops enforcing it.
-- * New event kinds: `forgotten` (a service key retired, by whom), `dropped` (a dead letter dropped
--   by an operator, who and why). `replayed` is now written by `agentctl dlq replay`.
ALTER TABLE agent.agents ADD COLUMN schema integer CHECK (schema > 0);

-- agent.allow_event_kinds(kinds...) widens the check on agent.events.kind by the kinds given,
-- keeping every kind it allows already: a migration adds its own kinds with it, so two migrations
-- written side by side cannot drop each other's (restating the whole list did).
CREATE FUNCTION agent.allow_event_kinds(VARIADIC kinds text[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    have text[];
    listed text;
BEGIN
    SELECT coalesce(array_agg(DISTINCT m[1]), '{}') INTO have
    FROM pg_constraint c, regexp_matches(pg_get_constraintdef(c.oid), '''([a-z_]+)''', 'g') AS m
    WHERE c.conrelid = 'agent.events'::regclass AND c.conname = 'events_kind_check';
    SELECT string_agg(quote_literal(k), ', ' ORDER BY k) INTO listed
    FROM (SELECT DISTINCT k FROM unnest(have || kinds) AS k) AS u;
    ALTER TABLE agent.events DROP CONSTRAINT IF EXISTS events_kind_check;
    -- an ARRAY of literals, as the migrations before wrote it (pg_get_constraintdef shows each kind
    -- quoted, which is how the next call reads them back); the old rows all satisfy the wider check:
    -- NOT VALID spares a scan of the audit log
    EXECUTE format('ALTER TABLE agent.events ADD CONSTRAINT events_kind_check CHECK (kind IN (%s)) NOT VALID',
                   listed);
END $$;
REVOKE ALL ON FUNCTION agent.allow_event_kinds(text[]) FROM PUBLIC;

SELECT agent.allow_event_kinds('forgotten', 'dropped');

-- As in 0006, and `agents`: rows of agents whose last heartbeat (a stopped agent's is when it
-- stopped) is older than `cutoff`. A running agent beats every AGENT_HEARTBEAT_INTERVAL (at most an
-- hour), and nothing younger than a day is removed, so a live agent's row is never pruned.
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
    ELSE
        RAISE EXCEPTION 'agent.prune_audit: what must be events, requests or agents' USING ERRCODE = '22023';
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- Retire the service key (device, service): its row in agent.service_state is removed, so neither
-- reconciliation nor the status views know it any more, and an event `forgotten` records what its
-- desired state was and who retired it: the session's login role, with `requested_by` (a label of at
-- most 200 characters, none of them control) after it in parentheses. True when the key was known,
-- false when there was nothing to forget. A command for the key still in the queue runs as usual
-- and records the key again: forget it once its last command has settled (agent.events).
CREATE FUNCTION agent.forget(device text, service text, requested_by text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    who  text := session_user;
    gone record;
BEGIN
    IF forget.device IS NULL OR forget.device !~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$' THEN
        RAISE EXCEPTION 'agent.forget: device is not a valid device id' USING ERRCODE = '22023';
    END IF;
    IF forget.service IS NULL OR forget.service !~ '^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,199}$' THEN
        RAISE EXCEPTION 'agent.forget: service is not a valid service key' USING ERRCODE = '22023';
    END IF;
    IF forget.requested_by IS NOT NULL AND (length(forget.requested_by) NOT BETWEEN 1 AND 200
                                            OR forget.requested_by ~ '[\x01-\x1f\x7f-\x9f]') THEN
        RAISE EXCEPTION 'agent.forget: requested_by must be 1 to 200 characters, none of them control'
            USING ERRCODE = '22023';
    END IF;
    IF forget.requested_by IS NOT NULL AND forget.requested_by <> who THEN
        who := who || ' (' || forget.requested_by || ')';
    END IF;
    DELETE FROM agent.service_state s WHERE s.device = forget.device AND s.service = forget.service
    RETURNING s.desired, s.desired_version, s.observed, s.last_request_id INTO gone;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO agent.events (device, service, kind, version, request_id, desired, observed, error, meta)
    VALUES (forget.device, forget.service, 'forgotten', gone.desired_version, gone.last_request_id, gone.desired,
            gone.observed, 'forgotten by ' || who, jsonb_build_object('by', who));
    RETURN true;
END $$;
REVOKE ALL ON FUNCTION agent.forget(text, text, text) FROM PUBLIC;
