-- 0013: a reconcile run reports a suspension policy that blocks nobody. Expand only: agents of
-- schema 5 and newer keep working (min_agent_schema stays 5).
-- * `policy_missing`: a reconcile run found a suspension policy that blocks nobody (an address list
--   no enabled firewall rule uses, a RADIUS group without a policy): one event per device and problem.
SELECT agent.allow_event_kinds('policy_missing');
