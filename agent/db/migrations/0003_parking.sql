-- 0003: work parked while its device is unreachable (VPN down) is recorded as such.
ALTER TABLE agent.events DROP CONSTRAINT events_kind_check;
ALTER TABLE agent.events ADD CONSTRAINT events_kind_check CHECK (kind IN (
    'applied', 'verified', 'noop', 'refreshed', 'failed', 'retried', 'superseded', 'duplicate', 'expired',
    'dead_lettered', 'replayed', 'parked'));

-- Per device: can the agent reach it, and since when (written by the VPN monitor).
CREATE TABLE agent.reachability (
    device     text PRIMARY KEY,
    reachable  boolean NOT NULL,
    reason     text,
    peer       text,
    since      timestamptz NOT NULL DEFAULT now(),
    checked_at timestamptz NOT NULL DEFAULT now(),
    agent_id   text
);
