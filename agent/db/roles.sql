-- Least privilege, applied by `agentctl db init` on every run (idempotent; new tables included).
-- agent_producer: enqueue commands and ask for syncs through the SECURITY DEFINER API, read state
--                 and the audit log, LISTEN (needs no grant). No access to PGMQ at all.
-- agent_worker:   what agentd needs for queue {queue} and no more.
-- Both are NOLOGIN groups: GRANT agent_producer TO webhook;  GRANT agent_worker TO agentd;
-- {q} {a} {dq} {da}: this queue's PGMQ tables; {qs} {dqs}: their msg_id sequences. db init applies
-- them for every site's queue, so an agent may move a command onto the queue of its device's site.
REVOKE ALL ON SCHEMA agent FROM PUBLIC;
REVOKE ALL ON SCHEMA pgmq FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA agent FROM PUBLIC;

GRANT USAGE ON SCHEMA agent TO agent_producer;
GRANT EXECUTE ON FUNCTION agent.enqueue(text, text, text, text, timestamptz, jsonb, text, integer, text),
                          agent.request_sync(text, text, text, boolean, text, text) TO agent_producer;
GRANT SELECT ON agent.service_state, agent.events, agent.devices TO agent_producer;
GRANT SELECT ON agent.site_keys TO agent_producer, agent_worker;  -- which lock is whose site's leader
GRANT EXECUTE ON FUNCTION agent.site_key(text) TO agent_worker;

GRANT USAGE ON SCHEMA agent, pgmq TO agent_worker;
GRANT EXECUTE ON FUNCTION agent.ensure_notify(text, integer),
                          agent.request_sync(text, text, text, boolean, text, text),
                          agent.prune_audit(text, timestamptz, integer, boolean) TO agent_worker;
GRANT SELECT ON agent.config, agent.devices, agent.sites, agent.schema_version, pgmq.meta TO agent_worker;
GRANT SELECT, UPDATE ON pgmq.notify_insert_throttle TO agent_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON pgmq.{q}, pgmq.{a}, pgmq.{dq}, pgmq.{da} TO agent_worker;
GRANT USAGE, SELECT ON SEQUENCE pgmq.{qs}, pgmq.{dqs} TO agent_worker;
GRANT SELECT, INSERT, UPDATE ON agent.service_state, agent.requests, agent.agents, agent.reachability,
                                agent.sync_devices TO agent_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON agent.device_claims, agent.sync_runs, agent.sync_items TO agent_worker;
GRANT SELECT, INSERT ON agent.events TO agent_worker;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA agent TO agent_worker;
