-- 0006: operating for years. Expand only: an agent of schema 5 keeps working against it.
-- * A device maintenance switch: while paused_at is set, commands for the device wait (parked,
--   no attempts used) with paused_reason as the reason shown.
-- * Indexes for retention (pruning by age in small batches) and for `agentctl events --since`.
-- * The compatibility range: agents whose schema is at least min_agent_schema may run against
--   this database (expand-then-contract: a migration that removes what older agents use raises it).
ALTER TABLE agent.devices ADD COLUMN paused_at timestamptz;
ALTER TABLE agent.devices ADD COLUMN paused_reason text CHECK (length(paused_reason) <= 500);

CREATE INDEX events_at_idx ON agent.events (at);
CREATE INDEX requests_seen_idx ON agent.requests (seen_at);
CREATE INDEX sync_runs_finished_idx ON agent.sync_runs (finished_at) WHERE finished_at IS NOT NULL;

INSERT INTO agent.config (key, value) VALUES ('min_agent_schema', '5')
ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;

-- Retention of the audit tables, for agents running as agent_worker (which may not delete from
-- them directly): one batch of rows older than `cutoff`, or with `dry` only their count. Rows
-- younger than a day are never removed, whatever the caller asks.
CREATE FUNCTION agent.prune_audit(what text, cutoff timestamptz, batch integer, dry boolean DEFAULT false)
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
    ELSE
        RAISE EXCEPTION 'agent.prune_audit: what must be events or requests' USING ERRCODE = '22023';
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;
