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
