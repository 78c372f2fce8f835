-- 0002: one row per running agent, so the fleet is visible from the database alone.
CREATE TABLE agent.agents (
    agent_id       text PRIMARY KEY,
    site           text NOT NULL,
    queue          text NOT NULL,
    host           text NOT NULL,
    pid            integer,
    version        text NOT NULL,
    started_at     timestamptz NOT NULL,
    last_heartbeat timestamptz NOT NULL,
    state          text NOT NULL CHECK (state IN ('starting', 'ready', 'degraded', 'stopping', 'stopped')),
    status         text,
    last_cycle_at  timestamptz,
    last_cycle_ms  double precision,
    stopped_at     timestamptz,
    figures        jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX agents_site_idx ON agent.agents (site);
