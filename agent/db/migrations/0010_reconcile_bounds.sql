-- 0010: reconciliation that a paused or unreachable device cannot wedge. Expand only: agents of
-- schema 7 keep working against it (min_agent_schema stays 5).
-- * agent.sync_devices.skipped: why a device of a run was not checked (paused, unreachable for longer
--   than AGENT_RECONCILE_UNREACHABLE_WAIT, removed): the run finishes with it reported, not open forever.
ALTER TABLE agent.sync_devices ADD COLUMN skipped text;
