-- Least privilege, applied by `agentctl db init` on every run (idempotent; new tables included).
-- agent_producer:      enqueue commands, follow them and their batches (agent.command_status,
--                      agent.batch_status) and ask for syncs through the SECURITY DEFINER API, read
--                      state and the audit log, LISTEN (needs no grant). No access to PGMQ at all.
-- agent_worker_<site>: what the agents of one site need (`db init --site S` creates it; its name is
--                      worker_role() in agent/db/schema.py): its site's queue and DLQ, the state
--                      and claims of its site's devices (row-level security), and, as a member of
--                      agent_worker_common, what every site's agents share.
-- agent_worker:        the same for every site at once (installs of one site, and those made before
--                      the per-site roles): granted every site's queue, every device's rows.
-- All are NOLOGIN groups: GRANT agent_producer TO webhook;  GRANT agent_worker_north TO agentd_north;
-- Sections: `common` once; `queue` for the queue `db init` is run for, with {role} agent_worker and
-- the site's role; `member` and `site` for the site's role (`db init` grants the membership itself,
-- only when missing: it needs the ADMIN option on agent_worker_common). {q} {a} {dq} {da}: the queue's PGMQ tables; {qs}
-- {dqs}: their msg_id sequences; {role}: a quoted role name; {site}: the site's name, a literal.
-- section: common
REVOKE ALL ON SCHEMA agent FROM PUBLIC;
REVOKE ALL ON SCHEMA pgmq FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA agent FROM PUBLIC;

GRANT USAGE ON SCHEMA agent TO agent_producer;
GRANT EXECUTE ON FUNCTION agent.enqueue(text, text, text, text, timestamptz, jsonb, text, integer, text, text, text),
                          agent.request_sync(text, text, text, boolean, text, text),
                          agent.command_status(bigint), agent.final_kind(text), agent.batch_status(text)
    TO agent_producer;
GRANT EXECUTE ON FUNCTION agent.forget(text, text, text) TO agent_producer;  -- retire a service key
GRANT SELECT ON agent.service_state, agent.events, agent.devices TO agent_producer;
GRANT SELECT ON agent.site_keys TO agent_producer;  -- which lock is whose site's leader

GRANT USAGE ON SCHEMA agent, pgmq TO agent_worker, agent_worker_common;
GRANT EXECUTE ON FUNCTION agent.ensure_notify(text, integer),
                          agent.request_sync(text, text, text, boolean, text, text),
                          agent.prune_audit(text, timestamptz, integer, boolean),
                          agent.move_message(text, bigint, integer, text, boolean),
                          agent.site_key(text) TO agent_worker, agent_worker_common;
GRANT SELECT ON agent.config, agent.devices, agent.sites, agent.site_keys, agent.schema_version, pgmq.meta
    TO agent_worker, agent_worker_common;
GRANT SELECT, UPDATE ON pgmq.notify_insert_throttle TO agent_worker, agent_worker_common;
GRANT SELECT, INSERT, UPDATE ON agent.requests, agent.agents, agent.reachability, agent.sync_devices
    TO agent_worker, agent_worker_common;
GRANT SELECT, INSERT, UPDATE, DELETE ON agent.sync_runs, agent.sync_items TO agent_worker, agent_worker_common;
GRANT SELECT, INSERT ON agent.events TO agent_worker, agent_worker_common;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA agent TO agent_worker, agent_worker_common;
GRANT SELECT ON SEQUENCE agent.msg_id_seq TO agent_worker, agent_worker_common;   -- the newest msg_id of every agent queue
-- rows of every device for agent_worker; a site's role gets them with its site's policies
GRANT SELECT, INSERT, UPDATE ON agent.service_state TO agent_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON agent.device_claims TO agent_worker;
-- section: queue
GRANT SELECT, INSERT, UPDATE, DELETE ON pgmq.{q}, pgmq.{a}, pgmq.{dq}, pgmq.{da} TO {role};
GRANT USAGE, SELECT ON SEQUENCE pgmq.{qs}, pgmq.{dqs} TO {role};
-- section: member
GRANT agent_worker_common TO {role};
-- section: site
GRANT SELECT, INSERT, UPDATE ON agent.service_state TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON agent.device_claims TO {role};
-- Restrictive: whatever other policy or role lets a member of the site's role see or write, only
-- rows of its site's devices are visible and writable (a device moved to another site leaves with them).
DROP POLICY IF EXISTS {role} ON agent.service_state;
CREATE POLICY {role} ON agent.service_state AS RESTRICTIVE FOR ALL TO {role}
    USING (device IN (SELECT d.id FROM agent.devices d WHERE d.site = {site}))
    WITH CHECK (device IN (SELECT d.id FROM agent.devices d WHERE d.site = {site}));
DROP POLICY IF EXISTS {role} ON agent.device_claims;
CREATE POLICY {role} ON agent.device_claims AS RESTRICTIVE FOR ALL TO {role}
    USING (device IN (SELECT d.id FROM agent.devices d WHERE d.site = {site}))
    WITH CHECK (device IN (SELECT d.id FROM agent.devices d WHERE d.site = {site}));
