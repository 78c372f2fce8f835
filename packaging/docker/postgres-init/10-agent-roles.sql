-- Run by the postgres image at the database's first start (/docker-entrypoint-initdb.d), as the
-- owner `agent`: the agent's login `agentd` (a member of agent_worker, what agentd needs and no more)
-- and a producer login `webhook` (agent_producer: agent.enqueue and reading state). The group roles
-- get their privileges from `agentctl db init` (the migrate service). Passwords come from the compose
-- secrets, read by psql itself (never on a command line).
-- A database created before this script existed: run these statements once as its owner.
\set ON_ERROR_STOP on
\set agentd_password `cat /run/secrets/agentd_password`
\set webhook_password `cat /run/secrets/webhook_password`
SELECT 'CREATE ROLE agent_worker NOLOGIN' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'agent_worker')
\gexec
SELECT 'CREATE ROLE agent_producer NOLOGIN'
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'agent_producer')
\gexec
CREATE ROLE agentd LOGIN PASSWORD :'agentd_password' IN ROLE agent_worker;
CREATE ROLE webhook LOGIN PASSWORD :'webhook_password' IN ROLE agent_producer;
