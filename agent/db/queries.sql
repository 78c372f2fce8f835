-- Every statement the agent sends, by name. Parameters are always bound ($1...).
-- {q}, {a}, {dq}, {da} are the quoted identifiers of the queue's and the DLQ's PGMQ tables
-- (pgmq.q_<queue>, pgmq.a_<queue>), filled in once from the validated queue name: PGMQ's own
-- functions have no read_ct fence, so the hot path touches its tables directly.

-- name: read
-- The next visible messages, as pgmq.read takes them (vt, read_ct, last_read_at) but high-priority
-- ones first ({high}: agent/executor/priority.py; found through the queue's partial index
-- `high_index`), then the rest in msg_id order; returned in msg_id order.
-- Bodies over $4 bytes (headers over 8 KiB) are not fetched: their size comes instead, and they are
-- dead-lettered without ever being held in the agent. last_id: the newest real msg_id (every agent
-- queue takes its ids from agent.msg_id_seq; a row above it was forged by hand); db_now: the
-- database's clock, the one not_after is judged by. $1: the queue's name (the statement is bound to
-- its table already; kept so that callers of the pgmq.read form work unchanged). The rows taken are
-- updated through the primary key (`= ANY (ARRAY(...))`): joined to the CTEs, the planner hashed the
-- whole queue table for every read, a cost that grew with the backlog. The limits are subqueries,
-- `(SELECT $3::integer)`: a limit the planner sees (a parameter's value in a custom plan) made every
-- generic plan look dearer, so each of a drain's hundreds of reads was planned anew; the plan is
-- the same either way (the index that gives msg_id order), and now it is made once per connection.
WITH hi AS (
    SELECT msg_id FROM pgmq.{q}
    WHERE {high} AND vt <= clock_timestamp()
    ORDER BY msg_id LIMIT (SELECT $3::integer)
    FOR UPDATE SKIP LOCKED
), lo AS (
    SELECT msg_id FROM pgmq.{q}
    WHERE vt <= clock_timestamp() AND msg_id NOT IN (SELECT msg_id FROM hi)
    ORDER BY msg_id LIMIT greatest(0, $3 - (SELECT count(*) FROM hi))
    FOR UPDATE SKIP LOCKED
), r AS (
    UPDATE pgmq.{q} m
    SET last_read_at = clock_timestamp(), vt = clock_timestamp() + make_interval(secs => $2::integer),
        read_ct = m.read_ct + 1
    WHERE m.msg_id = ANY (ARRAY(SELECT msg_id FROM hi UNION ALL SELECT msg_id FROM lo))
    RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.message, m.headers
)
SELECT r.msg_id, r.read_ct, r.enqueued_at,
       CASE WHEN octet_length(t.body) <= $4 THEN t.body END AS message, octet_length(t.body) AS size,
       CASE WHEN octet_length(t.head) <= 8192 THEN t.head END AS headers, octet_length(t.head) AS headers_size,
       (SELECT last_value FROM agent.msg_id_seq) AS last_id, clock_timestamp() AS db_now
FROM r, LATERAL (SELECT r.message::text, r.headers::text) AS t(body, head)
WHERE $1::text IS NOT NULL
ORDER BY r.msg_id;

-- name: read_high
-- `read`, of the high-priority messages only: while AGENT_PREFETCH messages are already held, a
-- restore is still read at once (see Consumer.read_until_short), instead of after a take frees room.
WITH hi AS (
    SELECT msg_id FROM pgmq.{q}
    WHERE {high} AND vt <= clock_timestamp()
    ORDER BY msg_id LIMIT (SELECT $2::integer)
    FOR UPDATE SKIP LOCKED
), r AS (
    UPDATE pgmq.{q} m
    SET last_read_at = clock_timestamp(), vt = clock_timestamp() + make_interval(secs => $1::integer),
        read_ct = m.read_ct + 1
    WHERE m.msg_id = ANY (ARRAY(SELECT msg_id FROM hi))
    RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.message, m.headers
)
SELECT r.msg_id, r.read_ct, r.enqueued_at,
       CASE WHEN octet_length(t.body) <= $3 THEN t.body END AS message, octet_length(t.body) AS size,
       CASE WHEN octet_length(t.head) <= 8192 THEN t.head END AS headers, octet_length(t.head) AS headers_size,
       (SELECT last_value FROM agent.msg_id_seq) AS last_id, clock_timestamp() AS db_now
FROM r, LATERAL (SELECT r.message::text, r.headers::text) AS t(body, head)
ORDER BY r.msg_id;

-- name: read_devices
-- The next visible messages of some devices ($2; $3 the room of each, as text), as `read` returns them
-- and with the same effect on the queue: the lanes about to be served while a backlog waits are
-- topped up in one statement (Consumer.top_up), each device's high-priority messages first, then
-- the rest in msg_id order, at most its room (device_index makes it cheap). The arrays are
-- subqueries, as `read`'s limits are: a planner that sees how many devices there are finds every
-- generic plan dearer, and plans each top-up anew.
WITH want AS (
    SELECT w.device, w.room FROM unnest((SELECT $2::text[]), (SELECT $3::text[]::integer[])) AS w(device, room)
), hi AS (
    SELECT w.device, m.msg_id FROM want w CROSS JOIN LATERAL (
        SELECT msg_id FROM pgmq.{q}
        WHERE {high} AND (message->>'device') = w.device AND vt <= clock_timestamp()
        ORDER BY msg_id LIMIT w.room
        FOR UPDATE SKIP LOCKED) m
), lo AS (
    SELECT m.msg_id FROM want w CROSS JOIN LATERAL (
        SELECT msg_id FROM pgmq.{q}
        WHERE (message->>'device') = w.device AND vt <= clock_timestamp() AND msg_id NOT IN (SELECT msg_id FROM hi)
        ORDER BY msg_id LIMIT greatest(0, w.room - (SELECT count(*) FROM hi WHERE hi.device = w.device))
        FOR UPDATE SKIP LOCKED) m
), r AS (
    UPDATE pgmq.{q} m
    SET last_read_at = clock_timestamp(), vt = clock_timestamp() + make_interval(secs => $1::integer),
        read_ct = m.read_ct + 1
    WHERE m.msg_id = ANY (ARRAY(SELECT msg_id FROM hi UNION ALL SELECT msg_id FROM lo))
    RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.message, m.headers
)
SELECT r.msg_id, r.read_ct, r.enqueued_at,
       CASE WHEN octet_length(t.body) <= $4 THEN t.body END AS message, octet_length(t.body) AS size,
       CASE WHEN octet_length(t.head) <= 8192 THEN t.head END AS headers, octet_length(t.head) AS headers_size,
       (SELECT last_value FROM agent.msg_id_seq) AS last_id, clock_timestamp() AS db_now
FROM r, LATERAL (SELECT r.message::text, r.headers::text) AS t(body, head)
ORDER BY r.msg_id;

-- name: device_index
-- For read_devices: a queue's messages by device, in order (created by `db init`).
CREATE INDEX IF NOT EXISTS {qdev} ON pgmq.{q} ((message->>'device'), msg_id);

-- name: high_index
-- For read and read_devices: a queue's high-priority messages, in order (created by `db init`; by
-- migration 0016 for the queues of agent.sites that existed before).
CREATE INDEX IF NOT EXISTS {qhigh} ON pgmq.{q} (msg_id) WHERE {high};

-- name: held_index
-- For the guard's statements: a queue's held messages (created by `db init`; by migration 0018 for
-- the queues of agent.sites). What PGMQ's index on vt found for them (see drop_vt_index).
CREATE INDEX IF NOT EXISTS {qheld} ON pgmq.{q} (msg_id) WHERE headers->>'guard' = 'held';

-- name: archive_index
-- The archive's index on archived_at (retention by age) as a BRIN index under PGMQ's name for it
-- (pgmq.create then finds it there and makes no B-tree): archived rows are appended in time order,
-- and an append into a block range not summarised yet writes no index entry (a B-tree entry per
-- archived command did). Built once; `db init` again leaves it as it is.
DO $$ BEGIN
    IF EXISTS (SELECT 1 FROM pg_class c JOIN pg_am am ON am.oid = c.relam
               WHERE c.oid = to_regclass('pgmq.{aat}') AND am.amname <> 'brin') THEN
        DROP INDEX pgmq.{aat};
    END IF;
END $$;
CREATE INDEX IF NOT EXISTS {aat} ON pgmq.{a} USING brin (archived_at);

-- name: drop_vt_index
-- PGMQ's index on vt, which no statement of the agent needs (reads take messages in msg_id order,
-- through the primary key or high_index): with it, every read (vt, read_ct, last_read_at) wrote a
-- new entry into each of the queue's indexes; without it, a read updates the row in place (HOT),
-- on the room fillfactor 70 leaves. Dropped by `db init` after pgmq.create (which makes it).
DROP INDEX IF EXISTS pgmq.{qvt};

-- name: load_devices
SELECT id, driver, address, site, options::text AS options, credential,
       CASE WHEN paused_at IS NOT NULL THEN coalesce(paused_reason, 'maintenance') END AS paused
FROM agent.devices WHERE site = $1 ORDER BY id;

-- name: load_some_devices
-- Devices messages named that the inventory does not hold, of any site: the agent's own join it;
-- another site's come with the queue that site records (NULL: none) and whether it and its DLQ
-- exist in PGMQ, to move their commands there.
SELECT d.id, d.driver, d.address, d.site, d.options::text AS options, d.credential,
       CASE WHEN d.paused_at IS NOT NULL THEN coalesce(d.paused_reason, 'maintenance') END AS paused,
       s.queue AS site_queue,
       (SELECT count(*) = 2 FROM pgmq.meta m WHERE m.queue_name IN (s.queue, s.queue || '_dlq')) AS queue_ready
FROM agent.devices d LEFT JOIN agent.sites s ON s.name = d.site
WHERE d.id = ANY($1::text[]) ORDER BY d.id;

-- name: unrecorded_sites
-- Of the sites $1, those agent.sites has no queue for (`agentctl device add` refuses them).
SELECT x.name FROM unnest($1::text[]) AS x(name)
WHERE NOT EXISTS (SELECT 1 FROM agent.sites s WHERE s.name = x.name) ORDER BY x.name;

-- name: site_routes
-- The agent.sites rows naming this agent's site ($1) or queue ($2): checked at start.
SELECT name, queue FROM agent.sites WHERE name = $1 OR queue = $2 ORDER BY name;

-- name: pause_device
UPDATE agent.devices SET paused_at = coalesce(paused_at, now()), paused_reason = $2, updated_at = now()
WHERE id = $1 RETURNING id;

-- name: resume_device
UPDATE agent.devices SET paused_at = NULL, paused_reason = NULL, updated_at = now()
WHERE id = $1 RETURNING id;

-- name: remove_device
-- `agentctl device remove`: device $1, its service keys (each recorded as `forgotten`, by the login
-- role with the label $2) and its reachability row, in one statement. Keys left by a device removed
-- before (by an older agentctl) are forgotten too. removed: whether the device was there.
WITH gone AS (
    DELETE FROM agent.service_state WHERE device = $1
    RETURNING device, service, desired, desired_version, observed, last_request_id
), recorded AS (
    INSERT INTO agent.events (device, service, kind, version, request_id, desired, observed, error, meta)
    SELECT g.device, g.service, 'forgotten', g.desired_version, g.last_request_id, g.desired, g.observed,
           'forgotten by ' || session_user || ' (' || $2 || '): device removed',
           jsonb_build_object('by', session_user || ' (' || $2 || ')', 'reason', 'device removed')
    FROM gone g
    RETURNING 1
), reach AS (
    DELETE FROM agent.reachability WHERE device = $1 RETURNING 1
), dev AS (
    DELETE FROM agent.devices WHERE id = $1 RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM dev) AS removed, (SELECT count(*) FROM recorded) AS forgotten;

-- name: forget_service
SELECT agent.forget($1::text, $2::text, $3::text);

-- name: events
-- The audit trail for the support desk, newest $4 rows first (the caller shows them oldest first).
SELECT id, at, device, service, kind, msg_id, version, request_id, desired, observed, attempt,
       duration_ms, error, agent_id, applied_at
FROM agent.events
WHERE ($1::text IS NULL OR request_id = $1) AND ($2::text IS NULL OR device = $2)
  AND ($3::timestamptz IS NULL OR at >= $3)
ORDER BY id DESC LIMIT $4;

-- name: extend_leases
-- Fenced by read_ct: a message another reader took since is not ours to extend.
UPDATE pgmq.{q} m SET vt = clock_timestamp() + make_interval(secs => $3::integer)
FROM unnest($1::text[]::bigint[], $2::text[]::integer[]) AS x(id, rc)
WHERE m.msg_id = x.id AND m.read_ct = x.rc;

-- name: release
UPDATE pgmq.{q} m SET vt = clock_timestamp()
FROM unnest($1::text[]::bigint[], $2::text[]::integer[]) AS x(id, rc)
WHERE m.msg_id = x.id AND m.read_ct = x.rc;

-- name: queue_lock
SELECT pgmq.acquire_queue_lock($1::text);

-- name: claim_devices
-- Device claims are leases held by a process: $1 agent id, $8 this process's instance, $2 devices
-- to claim (distinct), $3 their lease seconds, $4 devices to release, $5 host and $6 pid of this
-- agent, $7 instances known dead (their leases are void at once). A lease held by another process
-- (another agent, or one started with the same agent id) is taken over only once it expired, so an
-- agent that lost its database connection mid-operation keeps the device until that operation
-- surely ended. Claiming a device this process holds renews its lease. `holders`: who holds the others.
WITH released AS (
    DELETE FROM agent.device_claims c WHERE c.instance = $8 AND c.device = ANY($4::text[]) RETURNING c.device
), holders AS (
    SELECT c.device, c.agent_id, c.instance, c.host, c.pid FROM agent.device_claims c
    WHERE c.device = ANY($2::text[]) AND c.instance IS DISTINCT FROM $8
), claimed AS (
    INSERT INTO agent.device_claims AS c (device, agent_id, instance, host, pid, claimed_at, expires_at)
    SELECT x.d, $1, $8, $5, $6, clock_timestamp(), clock_timestamp() + make_interval(secs => x.ttl)
    FROM unnest($2::text[], $3::text[]::double precision[]) AS x(d, ttl)
    ON CONFLICT (device) DO UPDATE SET agent_id = EXCLUDED.agent_id, instance = EXCLUDED.instance,
        host = EXCLUDED.host, pid = EXCLUDED.pid, claimed_at = EXCLUDED.claimed_at, expires_at = EXCLUDED.expires_at
    WHERE c.instance = EXCLUDED.instance OR c.expires_at < clock_timestamp() OR c.instance = ANY($7::text[])
    RETURNING c.device
)
SELECT array(SELECT device FROM claimed) AS claimed, (SELECT count(*) FROM released) AS released,
       (SELECT coalesce(jsonb_agg(h), '[]') FROM holders h)::text AS holders;

-- name: renew_claims
-- $1 agent id, $4 this process's instance: only its own leases are renewed.
UPDATE agent.device_claims c SET expires_at = clock_timestamp() + make_interval(secs => x.ttl)
FROM unnest($2::text[], $3::text[]::double precision[]) AS x(d, ttl)
WHERE c.agent_id = $1 AND c.instance = $4 AND c.device = x.d RETURNING c.device;

-- name: release_all_claims
DELETE FROM agent.device_claims WHERE agent_id = $1 AND instance = $2;

-- name: notify_enabled
SELECT EXISTS (SELECT 1 FROM pgmq.notify_insert_throttle WHERE queue_name = $1::text)
   AND EXISTS (SELECT 1 FROM pg_trigger
               WHERE tgname = 'trigger_notify_queue_insert_listeners'
                 AND tgrelid = to_regclass(format('pgmq.%I', 'q_' || $1::text)));

-- name: msg_ids_shared
-- Whether queue $1 takes its msg_ids from agent.msg_id_seq (agent.share_msg_ids, run by db init).
SELECT EXISTS (SELECT 1 FROM pg_trigger
               WHERE tgname = 'agent_msg_id' AND tgrelid = to_regclass(format('pgmq.%I', 'q_' || $1::text)));

-- name: share_msg_ids
SELECT agent.share_msg_ids($1::text);

-- name: enable_notify
SELECT pgmq.enable_notify_insert($1::text, $2::integer);

-- name: schema_version
SELECT coalesce(max(version), 0) FROM agent.schema_version;

-- name: schema_compat
-- The database's schema version and the oldest agent schema it still serves (min_agent_schema,
-- recorded by the migrations; before 0006 there was none: only the same version).
SELECT coalesce(max(version), 0) AS version,
       (SELECT value::integer FROM agent.config WHERE key = 'min_agent_schema') AS min_agent
FROM agent.schema_version;

-- name: applied_migrations
SELECT version, name, applied_at FROM agent.schema_version ORDER BY version;

-- name: queue_exists
SELECT count(*) = 2 FROM pgmq.meta WHERE queue_name IN ($1::text, $2::text);

-- name: may_consume
-- Whether this login may read and settle the queue $1 and send to its DLQ $2 (checked at start).
SELECT has_table_privilege(format('pgmq.%I', 'q_' || $1::text), 'SELECT, UPDATE, DELETE')
   AND has_table_privilege(format('pgmq.%I', 'q_' || $2::text), 'INSERT');

-- name: dlq_list
SELECT msg_id, enqueued_at, read_ct, message::text AS message, headers::text AS headers
FROM pgmq.{dq} ORDER BY msg_id LIMIT $1;

-- name: dlq_take
WITH gone AS (
    DELETE FROM pgmq.{dq} m WHERE m.msg_id = ANY($1::bigint[])
    RETURNING m.msg_id, m.vt, m.read_ct, m.enqueued_at, m.last_read_at, m.message, m.headers
), kept AS (
    INSERT INTO pgmq.{da} (msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers)
    SELECT msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers FROM gone
)
SELECT msg_id, message::text AS message, headers::text AS headers FROM gone ORDER BY msg_id;

-- name: send
SELECT pgmq.send($1::text, $2::jsonb, $3::jsonb);

-- name: queue_depth
SELECT count(*) FROM pgmq.{q};

-- name: dlq_ids
SELECT msg_id FROM pgmq.{dq} ORDER BY msg_id;

-- name: next_visible
-- How long until the next message not in flight ($1) is visible; zero or less when one already is
-- (a retry that became visible after the last read and before this look: nothing notifies it).
SELECT min(vt) - clock_timestamp() AS wait FROM pgmq.{q} WHERE NOT (msg_id = ANY($1::text[]::bigint[]));

-- name: heartbeat
-- $13 instance, $14 host_id: the row is this process's (agent_holder/register_agent); one another
-- process has registered since (this one's heartbeat went stale) is left to it.
INSERT INTO agent.agents AS a (agent_id, site, queue, host, pid, version, started_at, last_heartbeat, state,
                               status, last_cycle_at, last_cycle_ms, stopped_at, figures, instance, host_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, now(), $8, $9, $10, $11, CASE WHEN $8 = 'stopped' THEN now() END, $12::jsonb,
        $13, $14)
ON CONFLICT (agent_id) DO UPDATE SET
    site = EXCLUDED.site, queue = EXCLUDED.queue, host = EXCLUDED.host, pid = EXCLUDED.pid,
    version = EXCLUDED.version, started_at = EXCLUDED.started_at, last_heartbeat = now(),
    state = EXCLUDED.state, status = EXCLUDED.status, last_cycle_at = EXCLUDED.last_cycle_at,
    last_cycle_ms = EXCLUDED.last_cycle_ms, stopped_at = EXCLUDED.stopped_at, figures = EXCLUDED.figures,
    instance = EXCLUDED.instance, host_id = EXCLUDED.host_id
WHERE a.instance IS NULL OR a.instance = EXCLUDED.instance;

-- name: agents_seen
-- `agentctl db status`: the agents not stopped, with the release and the schema each was built for
-- (recorded since schema 12: read so that it also answers against an older database).
SELECT agent_id, site, version, (to_jsonb(a)->>'schema')::integer AS schema, state, last_heartbeat
FROM agent.agents a WHERE state <> 'stopped' ORDER BY site, agent_id;

-- name: unregister_agent
-- This process ($2) is done (agentd --once, or a start that failed): its agent id is free at once.
UPDATE agent.agents SET state = 'stopped', stopped_at = now()
WHERE agent_id = $1 AND instance = $2 AND state <> 'stopped';

-- name: agent_holder
-- The process registered under agent id $1 (agent/identity.py): where it runs, how fresh its
-- heartbeat is, and the row's version (xmin) for register_agent's compare and set.
SELECT host, host_id, pid, state, version, extract(epoch FROM now() - last_heartbeat) AS heartbeat_age,
       xmin::text AS token
FROM agent.agents WHERE agent_id = $1;

-- name: register_agent
-- Record this process ($7 instance, $8 host_id) under agent id $1, replacing the row only as
-- agent_holder read it ($9: its xmin; NULL: there was none). $10: the schema version this agent was
-- built for. True when registered.
INSERT INTO agent.agents AS a (agent_id, site, queue, host, pid, version, started_at, last_heartbeat, state,
                               instance, host_id, schema)
VALUES ($1, $2, $3, $4, $5, $6, now(), now(), 'starting', $7, $8, $10)
ON CONFLICT (agent_id) DO UPDATE SET
    site = EXCLUDED.site, queue = EXCLUDED.queue, host = EXCLUDED.host, pid = EXCLUDED.pid,
    version = EXCLUDED.version, started_at = EXCLUDED.started_at, last_heartbeat = now(), state = 'starting',
    status = NULL, stopped_at = NULL, instance = EXCLUDED.instance, host_id = EXCLUDED.host_id,
    schema = EXCLUDED.schema
WHERE a.xmin::text = $9::text
RETURNING true;

-- name: queue_stats
-- Cheap sample for metrics and status: counts are capped, the oldest message is found by msg_id.
-- Commands held by the guard (invisible for a century: found by held_index) are counted apart
-- and are not the oldest message: they wait for an operator, whom their own alert calls.
SELECT (SELECT count(*) FROM (SELECT 1 FROM pgmq.{q} LIMIT $1) s) AS depth,
       (SELECT extract(epoch FROM clock_timestamp() - enqueued_at) FROM pgmq.{q}
        WHERE vt < clock_timestamp() + interval '50 years' ORDER BY msg_id LIMIT 1) AS oldest,
       (SELECT count(*) FROM (SELECT 1 FROM pgmq.{q} WHERE headers->>'guard' = 'held'
                                AND vt > clock_timestamp() + interval '50 years' LIMIT $1) s) AS held,
       (SELECT count(*) FROM (SELECT 1 FROM pgmq.{dq} LIMIT $1) s) AS dlq_depth,
       (SELECT extract(epoch FROM clock_timestamp() - enqueued_at) FROM pgmq.{dq} ORDER BY msg_id LIMIT 1) AS dlq_oldest;

-- name: drifted
-- The drift of one site's devices ($2), at most $1 rows. desired_failed: its newest command was
-- dead-lettered, so reconciliation leaves it as it is.
SELECT s.device, s.service, s.desired, s.observed, s.desired_failed AS failed, s.last_error
FROM agent.service_state s JOIN agent.devices d ON d.id = s.device AND d.site = $2
WHERE s.desired IS NOT NULL AND s.desired IS DISTINCT FROM s.observed ORDER BY s.device, s.service LIMIT $1;

-- name: fleet
SELECT agent_id, site, queue, host, pid, version, started_at, last_heartbeat, state, status,
       extract(epoch FROM now() - last_heartbeat) AS heartbeat_age, figures::text AS figures
FROM agent.agents WHERE $1::text IS NULL OR site = $1 ORDER BY site, agent_id;

-- name: fleet_sites
-- Every site ($1 NULL) or one: recorded (agent.sites), served by an agent, or holding devices. Its
-- recorded queue; its leader: the backend holding the leadership advisory lock
-- (agent/reconcile/leader.py: class $2, object the site's key), by its application_name; its
-- devices found unreachable (agent.reachability, written by the agents' VPN guard); how many devices
-- it holds. pg_locks and the reachability rows are read once for all sites.
WITH names AS (
    SELECT name FROM agent.sites
    UNION SELECT site FROM agent.agents
    UNION SELECT DISTINCT site FROM agent.devices
), leaders AS (
    SELECT DISTINCT ON (l.objid) l.objid::bigint AS key, a.application_name
    FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.classid::bigint = $2::bigint
), unreachable AS (
    SELECT d.site, jsonb_agg(jsonb_build_object('device', r.device, 'reason', r.reason, 'peer', r.peer,
                                                'since', r.since) ORDER BY r.device) AS devices
    FROM agent.reachability r JOIN agent.devices d ON d.id = r.device
    WHERE NOT r.reachable GROUP BY d.site
)
SELECT n.name AS site, s.queue, l.application_name AS leader_backend,
       coalesce(u.devices, '[]')::text AS unreachable,
       (SELECT count(*) FROM agent.devices d WHERE d.site = n.name) AS devices
FROM names n
LEFT JOIN agent.sites s ON s.name = n.name
LEFT JOIN agent.site_keys k ON k.site = n.name
LEFT JOIN leaders l ON l.key = k.key
LEFT JOIN unreachable u ON u.site = n.name
WHERE $1::text IS NULL OR n.name = $1
ORDER BY n.name;

-- name: queue_names
SELECT queue_name FROM pgmq.meta;


-- name: report
-- One statement, so one round trip and one atomic unit: for every settled message the fenced
-- archive (or DLQ move), retry or park, the state report and the audit events. A message whose
-- read_ct changed (another reader took it after our lease ran out) is neither archived nor moved.
-- $1 [{id, rc, h, dest}]: archive; h = DLQ headers to dead-letter it; with `dest`, move it to that queue
--    (another site's) instead, h merged into its headers there
-- $2 DLQ name
-- $3 [{id, rc, delay, park, bounces, reason}]: make visible again later (bounces: the new count, from the
--    agent; reason: the park reason code to keep as parked_reason, '' to clear it (a retry), NULL to keep it)
-- $4 states, a JSON array of columns: [[device...], [service...], [desired...], [version...], [observed...],
--    [observed_at...], [applied_at...], [verified_at...], [error...], [msg_id...], [request_id...], [meta...],
--    [failed...]] (times as unix seconds)
-- $5 events, a JSON array of columns: [[device...], [service...], [kind...], [msg_id...], [version...],
--    [request_id...], [desired...], [observed...], [attempt...], [duration_ms...], [error...], [meta...],
--    [applied_at...]] (applied_at as unix seconds: the write this attempt made, on the event that ends it)
-- $6 agent id  $7 reconcile results
-- $8 keep settled messages in PGMQ's archive (false: AGENT_ARCHIVE=false, they are deleted; the audit is in events)
-- $9 this queue's name (moves go through agent.move_message: an agent may send to no other queue)
WITH done AS (
    DELETE FROM pgmq.{q} m
    USING jsonb_to_recordset($1::jsonb) AS f(id bigint, rc integer, h jsonb, dest text)
    WHERE m.msg_id = f.id AND m.read_ct = f.rc AND f.dest IS NULL
    RETURNING m.msg_id, m.vt, m.read_ct, m.enqueued_at, m.last_read_at, m.message, m.headers, f.h
), archived AS (
    INSERT INTO pgmq.{a} (msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers)
    SELECT msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers FROM done WHERE $8::boolean
    RETURNING msg_id
), dead AS (
    -- headers that are not an object (a plain pgmq.send may put any JSON there) are kept whole under
    -- original_headers: the reason is always a key of an object, never appended to an array
    SELECT pgmq.send($2::text, d.message, CASE WHEN jsonb_typeof(d.headers) = 'object' THEN d.headers
                                               WHEN coalesce(jsonb_typeof(d.headers), 'null') = 'null' THEN '{}'::jsonb
                                               ELSE jsonb_build_object('original_headers', d.headers)
                                          END || d.h) AS dlq_id
    FROM done d WHERE d.h IS NOT NULL
), moved AS (   -- its version there is its new msg_id: this queue's origin_msg_id and bounces stay behind
    SELECT f.id AS msg_id FROM jsonb_to_recordset($1::jsonb) AS f(id bigint, rc integer, dest text)
    WHERE f.dest IS NOT NULL AND agent.move_message($9::text, f.id, f.rc, f.dest, $8::boolean) IS NOT NULL
), later AS (   -- held (the guard): invisible for a century, until `agentctl guard` releases or discards it
    UPDATE pgmq.{q} m SET vt = clock_timestamp() + CASE WHEN l.hold THEN interval '100 years'
                                                        ELSE make_interval(secs => l.delay) END,
           headers = CASE WHEN l.park
                          THEN CASE WHEN jsonb_typeof(m.headers) = 'object' THEN m.headers ELSE '{}'::jsonb END
                               || jsonb_build_object('bounces', l.bounces)
                               || CASE WHEN l.reason <> '' THEN jsonb_build_object('parked_reason', l.reason)
                                       ELSE '{}'::jsonb END
                               || CASE WHEN l.hold THEN jsonb_build_object('guard', 'held', 'held_at', now())
                                       ELSE '{}'::jsonb END
                          WHEN l.reason = '' AND jsonb_typeof(m.headers) = 'object' AND m.headers ? 'parked_reason'
                          THEN m.headers - 'parked_reason'
                          ELSE m.headers END
    FROM jsonb_to_recordset($3::jsonb)
         AS l(id bigint, rc integer, delay double precision, park boolean, bounces integer, reason text, hold boolean)
    WHERE m.msg_id = l.id AND m.read_ct = l.rc
    RETURNING m.msg_id
), states AS (
    INSERT INTO agent.service_state AS s (
        device, service, desired, desired_version, desired_at, observed, observed_at,
        applied_at, verified_at, last_error, last_error_at, last_msg_id, last_request_id, meta, updated_at,
        desired_failed)
    SELECT x.device, x.service, x.desired, coalesce(x.version, 0), CASE WHEN x.desired IS NOT NULL THEN now() END,
           coalesce(x.observed, 'unknown'), to_timestamp(x.observed_at), to_timestamp(x.applied_at),
           to_timestamp(x.verified_at),
           x.error, CASE WHEN x.error IS NOT NULL THEN now() END, x.msg_id, x.request_id, x.meta, now(),
           coalesce(x.failed, false)
    FROM (SELECT c.device, c.service, c.desired, c.version::bigint AS version, c.observed,
                 c.observed_at::double precision AS observed_at, c.applied_at::double precision AS applied_at,
                 c.verified_at::double precision AS verified_at, c.error, c.msg_id::bigint AS msg_id, c.request_id,
                 nullif(c.meta, 'null'::jsonb) AS meta, c.failed::boolean AS failed
          FROM ROWS FROM (jsonb_array_elements_text($4::jsonb->0), jsonb_array_elements_text($4::jsonb->1),
                          jsonb_array_elements_text($4::jsonb->2), jsonb_array_elements_text($4::jsonb->3),
                          jsonb_array_elements_text($4::jsonb->4), jsonb_array_elements_text($4::jsonb->5),
                          jsonb_array_elements_text($4::jsonb->6), jsonb_array_elements_text($4::jsonb->7),
                          jsonb_array_elements_text($4::jsonb->8), jsonb_array_elements_text($4::jsonb->9),
                          jsonb_array_elements_text($4::jsonb->10), jsonb_array_elements($4::jsonb->11),
                          jsonb_array_elements_text($4::jsonb->12))
               AS c(device, service, desired, version, observed, observed_at, applied_at, verified_at, error, msg_id,
                    request_id, meta, failed)) x
    -- State moves only forward: an observation older than the one recorded, or the error of a
    -- command older than the newest accepted one (a late report), changes nothing.
    ON CONFLICT (device, service) DO UPDATE SET
        desired         = CASE WHEN EXCLUDED.desired IS NOT NULL AND EXCLUDED.desired_version >= s.desired_version
                               THEN EXCLUDED.desired ELSE s.desired END,
        desired_at      = CASE WHEN EXCLUDED.desired IS NOT NULL AND EXCLUDED.desired_version > s.desired_version
                               THEN now() ELSE s.desired_at END,
        desired_version = CASE WHEN EXCLUDED.desired IS NOT NULL AND EXCLUDED.desired_version >= s.desired_version
                               THEN EXCLUDED.desired_version ELSE s.desired_version END,
        desired_failed  = CASE WHEN EXCLUDED.desired IS NOT NULL AND EXCLUDED.desired_version > s.desired_version
                               THEN EXCLUDED.desired_failed
                               WHEN EXCLUDED.desired_version = s.desired_version AND EXCLUDED.desired_failed THEN true
                               ELSE s.desired_failed END,
        observed        = CASE WHEN EXCLUDED.observed_at IS NOT NULL
                                    AND EXCLUDED.observed_at >= coalesce(s.observed_at, '-infinity')
                               THEN EXCLUDED.observed ELSE s.observed END,
        observed_at     = greatest(EXCLUDED.observed_at, s.observed_at),
        applied_at      = greatest(EXCLUDED.applied_at, s.applied_at),
        verified_at     = greatest(EXCLUDED.verified_at, s.verified_at),
        last_error      = CASE WHEN EXCLUDED.desired_version > 0 AND EXCLUDED.desired_version < s.desired_version
                               THEN s.last_error
                               WHEN EXCLUDED.last_error IS NOT NULL THEN EXCLUDED.last_error
                               WHEN EXCLUDED.verified_at IS NOT NULL THEN NULL ELSE s.last_error END,
        last_error_at   = CASE WHEN EXCLUDED.desired_version > 0 AND EXCLUDED.desired_version < s.desired_version
                               THEN s.last_error_at
                               WHEN EXCLUDED.last_error IS NOT NULL THEN now()
                               WHEN EXCLUDED.verified_at IS NOT NULL THEN NULL ELSE s.last_error_at END,
        last_msg_id     = CASE WHEN EXCLUDED.desired_version > 0 AND EXCLUDED.desired_version < s.desired_version
                               THEN s.last_msg_id ELSE coalesce(EXCLUDED.last_msg_id, s.last_msg_id) END,
        last_request_id = CASE WHEN EXCLUDED.desired_version > 0 AND EXCLUDED.desired_version < s.desired_version
                               THEN s.last_request_id ELSE coalesce(EXCLUDED.last_request_id, s.last_request_id) END,
        meta            = CASE WHEN EXCLUDED.desired_version > 0 AND EXCLUDED.desired_version < s.desired_version
                               THEN s.meta ELSE coalesce(EXCLUDED.meta, s.meta) END,
        updated_at      = now()
    RETURNING 1
), events AS (
    INSERT INTO agent.events (device, service, kind, msg_id, version, request_id, desired, observed,
                              attempt, duration_ms, error, agent_id, meta, applied_at)
    SELECT x.device, x.service, x.kind, x.msg_id::bigint, x.version::bigint, x.request_id, x.desired, x.observed,
           x.attempt::integer, x.duration_ms::double precision, x.error, $6, nullif(x.meta, 'null'::jsonb),
           to_timestamp(x.applied_at::double precision)
    FROM ROWS FROM (jsonb_array_elements_text($5::jsonb->0), jsonb_array_elements_text($5::jsonb->1),
                    jsonb_array_elements_text($5::jsonb->2), jsonb_array_elements_text($5::jsonb->3),
                    jsonb_array_elements_text($5::jsonb->4), jsonb_array_elements_text($5::jsonb->5),
                    jsonb_array_elements_text($5::jsonb->6), jsonb_array_elements_text($5::jsonb->7),
                    jsonb_array_elements_text($5::jsonb->8), jsonb_array_elements_text($5::jsonb->9),
                    jsonb_array_elements_text($5::jsonb->10), jsonb_array_elements($5::jsonb->11),
                    jsonb_array_elements_text($5::jsonb->12))
         AS x(device, service, kind, msg_id, version, request_id, desired, observed, attempt, duration_ms, error,
              meta, applied_at)
    RETURNING 1
), synced AS (   -- $7: reconcile messages finished here, with what they found (only those archived now)
    SELECT x.* FROM jsonb_to_recordset($7::jsonb)
         AS x(msg_id bigint, run bigint, device text, items jsonb, in_sync integer, checked integer,
              drifted integer, repaired integer, unreadable integer, failed integer, skipped text)
    JOIN done ON done.msg_id = x.msg_id
    JOIN agent.sync_devices sd ON sd.run = x.run AND sd.device = x.device  -- a forged run id records nothing
), items AS (
    INSERT INTO agent.sync_items (run, device, service, expected, found, result, error)
    SELECT s.run, s.device, i.service, i.expected, i.found, i.result, i.error
    FROM synced s, jsonb_to_recordset(s.items) AS i(service text, expected text, found text, result text, error text)
    ON CONFLICT (run, device, service) DO UPDATE SET found = EXCLUDED.found, result = EXCLUDED.result,
        error = EXCLUDED.error, at = now()
    RETURNING 1
), devs AS (
    UPDATE agent.sync_devices d SET state = 'done', done_at = now(), skipped = left(s.skipped, 500)
    FROM synced s WHERE d.run = s.run AND d.device = s.device AND d.state <> 'done'
    RETURNING d.run, d.device
), runs AS (   -- whether a run is finished is decided after this statement (finish_runs)
    UPDATE agent.sync_runs r SET
        checked = r.checked + t.checked, in_sync = r.in_sync + t.in_sync, drifted = r.drifted + t.drifted,
        repaired = r.repaired + t.repaired, unreadable = r.unreadable + t.unreadable, failed = r.failed + t.failed
    FROM (SELECT s.run, sum(s.checked) AS checked, sum(s.in_sync) AS in_sync, sum(s.drifted) AS drifted,
                 sum(s.repaired) AS repaired, sum(s.unreadable) AS unreadable, sum(s.failed) AS failed
          FROM synced s JOIN devs USING (run, device) GROUP BY s.run) t
    WHERE r.id = t.run
    RETURNING r.id
)
SELECT array_to_string(array(SELECT msg_id FROM done UNION ALL SELECT msg_id FROM moved), ',') AS left_queue,
       (SELECT count(*) FROM archived) AS archived,
       (SELECT count(*) FROM dead) AS dead,
       (SELECT count(*) FROM moved) AS moved,
       (SELECT count(*) FROM later) AS later, (SELECT count(*) FROM states) AS states,
       (SELECT count(*) FROM events) AS events, (SELECT count(*) FROM items) AS items,
       (SELECT count(pg_notify('agent_sync', 'progress')) FROM runs) AS progressed,
       array_to_string(array(SELECT id FROM runs), ',') AS runs;

-- name: finish_runs
-- After `report`, in its transaction: the runs $1 it counted devices of finish when every device of
-- theirs is done. A statement of its own, for what it sees: `report` updated the runs' rows, so a
-- second report of the same run waited for this transaction to commit, and this statement's
-- snapshot holds the devices of every report committed before it. Decided inside `report`, two
-- reports settling a run's last two devices at once each saw the other's still open (one snapshot
-- per statement), and the run never finished.
UPDATE agent.sync_runs r SET finished_at = clock_timestamp()  -- as near its commit as it gets: the leader's
WHERE r.id = ANY ($1::text[]::bigint[]) AND r.finished_at IS NULL     -- summaries follow finished_at
  AND NOT EXISTS (SELECT 1 FROM agent.sync_devices o WHERE o.run = r.id AND o.state <> 'done')
RETURNING r.id, pg_notify('agent_sync', r.id::text);

-- name: desired_for_sync
-- What a reconcile of one device checks: its services that have a desired state (within scope).
-- A key whose newest command was dead-lettered is left alone: only a replay or a newer command
-- sets it in motion again. $3: the run this reconcile message belongs to (it must exist).
SELECT service, desired, desired_version FROM agent.service_state
WHERE device = $1 AND desired IS NOT NULL AND NOT desired_failed AND ($2::text IS NULL OR service = $2)
  AND EXISTS (SELECT 1 FROM agent.sync_devices d WHERE d.run = $3 AND d.device = $1)
ORDER BY service;

-- name: sync_target_exists
SELECT EXISTS (SELECT 1 FROM agent.sync_devices d WHERE d.run = $1 AND d.device = $2);

-- name: feed_sync
-- The leader's feeder: send the next devices of open runs as reconcile messages, keeping at most
-- $3 outstanding, or $4 while commands are waiting in the queue (commands go first). A message
-- parked until later (its device unreachable or busy: it has a `bounces` header) holds no place, so
-- devices that are off do not slow the reconciliation of the others down.
WITH open AS (
    SELECT id, service, dry_run FROM agent.sync_runs WHERE site = $1 AND finished_at IS NULL
), outstanding AS (
    SELECT count(*) AS n FROM agent.sync_devices d JOIN open o ON o.id = d.run
    WHERE d.state = 'sent' AND NOT EXISTS (
        SELECT 1 FROM pgmq.{q} m WHERE m.msg_id = d.msg_id AND m.vt > clock_timestamp()
          AND jsonb_typeof(m.headers) = 'object' AND m.headers ? 'bounces')
), waiting AS (
    SELECT EXISTS (SELECT 1 FROM pgmq.{q} m WHERE m.vt <= clock_timestamp() AND NOT m.message ? 'reconcile') AS busy
), nxt AS (
    SELECT d.run, d.device, o.service, o.dry_run
    FROM agent.sync_devices d JOIN open o ON o.id = d.run
    WHERE d.state = 'pending'
    ORDER BY d.run, d.device
    LIMIT greatest(0, (CASE WHEN (SELECT busy FROM waiting) THEN $4::integer ELSE $3::integer END)
                      - (SELECT n FROM outstanding))
    FOR UPDATE OF d SKIP LOCKED
)
UPDATE agent.sync_devices d SET state = 'sent', sent_at = now(),
    msg_id = (SELECT m FROM pgmq.send($2::text, jsonb_build_object('reconcile', jsonb_build_object(
        'run', n.run, 'device', n.device, 'service', n.service, 'dry_run', n.dry_run))) AS m)
FROM nxt n WHERE d.run = n.run AND d.device = n.device
RETURNING d.run, d.device;

-- name: open_runs
SELECT EXISTS (SELECT 1 FROM agent.sync_runs WHERE site = $1 AND finished_at IS NULL);

-- name: start_scheduled_run
-- The leader's scheduled run of site $1 (asked by its login and $2, its agent id): every device of the site with
-- a desired state, except those still outstanding in an open run of the site, which that run checks.
-- So a device that holds its run open (a slow one) never holds the others' reconciliation up. No run
-- (run NULL) when every such device is outstanding; a finished empty run when the site has none.
WITH todo AS (
    SELECT DISTINCT s.device FROM agent.service_state s JOIN agent.devices d ON d.id = s.device
    WHERE d.site = $1 AND s.desired IS NOT NULL AND NOT s.desired_failed
), busy AS (
    SELECT DISTINCT o.device FROM agent.sync_devices o JOIN agent.sync_runs r ON r.id = o.run
    WHERE r.site = $1 AND r.finished_at IS NULL AND o.state <> 'done'
), fresh AS (
    SELECT device FROM todo EXCEPT SELECT device FROM busy
), run AS (
    INSERT INTO agent.sync_runs (site, kind, requested_by, devices, finished_at)
    SELECT $1, 'scheduled', session_user || ' (' || $2::text || ')', count(*), CASE WHEN count(*) = 0 THEN now() END
    FROM fresh
    HAVING count(*) > 0 OR NOT EXISTS (SELECT 1 FROM busy)
    RETURNING id
), devs AS (
    INSERT INTO agent.sync_devices (run, device) SELECT run.id, fresh.device FROM run, fresh RETURNING 1
)
SELECT (SELECT id FROM run) AS run, (SELECT count(*) FROM devs) AS devices, (SELECT count(*) FROM busy) AS outstanding;

-- name: finished_runs
-- Runs of the site finished after $2 (the leader logs one summary line for each).
SELECT id, kind, dry_run, device, service, devices, checked, in_sync, drifted, repaired, unreadable, failed,
       extract(epoch FROM finished_at - requested_at) AS took, finished_at
FROM agent.sync_runs WHERE site = $1 AND finished_at > $2 ORDER BY finished_at, id;

-- Retention (agent/retention.py): one batch of rows older than the cutoff $1 (at most $2 rows), or
-- (due_*) how many there are. Oldest first by primary key, so each batch is an index range.
-- name: prune_archive
DELETE FROM pgmq.{a} WHERE msg_id IN (
    SELECT msg_id FROM pgmq.{a} WHERE archived_at < $1 ORDER BY msg_id LIMIT $2);

-- name: due_archive
SELECT count(*) FROM pgmq.{a} WHERE archived_at < $1;

-- name: prune_dlq_archive
DELETE FROM pgmq.{da} WHERE msg_id IN (
    SELECT msg_id FROM pgmq.{da} WHERE archived_at < $1 ORDER BY msg_id LIMIT $2);

-- name: due_dlq_archive
SELECT count(*) FROM pgmq.{da} WHERE archived_at < $1;

-- name: prune_dlq
-- Never a dead letter someone holds right now (a replay in progress locks or leases it).
DELETE FROM pgmq.{dq} WHERE msg_id IN (
    SELECT msg_id FROM pgmq.{dq} WHERE enqueued_at < $1 AND vt <= clock_timestamp()
    ORDER BY msg_id LIMIT $2 FOR UPDATE SKIP LOCKED);

-- name: due_dlq
SELECT count(*) FROM pgmq.{dq} WHERE enqueued_at < $1 AND vt <= clock_timestamp();

-- name: prune_events
SELECT agent.prune_audit('events', $1, $2);

-- name: due_events
SELECT agent.prune_audit('events', $1, 0, true);

-- name: prune_batches
SELECT agent.prune_audit('batches', $1, $2);

-- name: due_batches
SELECT agent.prune_audit('batches', $1, 0, true);

-- name: prune_requests
SELECT agent.prune_audit('requests', $1, $2);

-- name: due_requests
SELECT agent.prune_audit('requests', $1, 0, true);

-- name: prune_sync_runs
-- $3: the site (NULL: every site); its items and devices go with a run (ON DELETE CASCADE).
DELETE FROM agent.sync_runs WHERE id IN (
    SELECT id FROM agent.sync_runs WHERE finished_at < $1 AND ($3::text IS NULL OR site = $3)
    ORDER BY id LIMIT $2);

-- name: due_sync_runs
SELECT count(*) FROM agent.sync_runs WHERE finished_at < $1 AND ($2::text IS NULL OR site = $2);

-- name: prune_agents
-- Agents whose last heartbeat is older than the cutoff (stopped, or gone without a word).
SELECT agent.prune_audit('agents', $1, $2);

-- name: due_agents
SELECT agent.prune_audit('agents', $1, 0, true);

-- name: table_stats
-- Size on disk (with indexes and TOAST) and the oldest row of each table that grows, found by index.
SELECT t.name, pg_total_relation_size(t.rel) AS bytes, extract(epoch FROM clock_timestamp() - t.oldest) AS oldest_age
FROM (VALUES
    ('queue', 'pgmq.{q}'::regclass, (SELECT enqueued_at FROM pgmq.{q} ORDER BY msg_id LIMIT 1)),
    ('archive', 'pgmq.{a}'::regclass, (SELECT archived_at FROM pgmq.{a} ORDER BY msg_id LIMIT 1)),
    ('dlq', 'pgmq.{dq}'::regclass, (SELECT enqueued_at FROM pgmq.{dq} ORDER BY msg_id LIMIT 1)),
    ('dlq_archive', 'pgmq.{da}'::regclass, (SELECT archived_at FROM pgmq.{da} ORDER BY msg_id LIMIT 1)),
    ('events', 'agent.events'::regclass, (SELECT at FROM agent.events ORDER BY id LIMIT 1)),
    ('requests', 'agent.requests'::regclass, (SELECT min(seen_at) FROM agent.requests)),
    ('sync_runs', 'agent.sync_runs'::regclass, (SELECT min(requested_at) FROM agent.sync_runs))
) AS t(name, rel, oldest);

-- name: accept
-- Write-ahead of intent, before any device is touched, in one statement: each request_id is
-- recorded with the command that first carried it (the lowest version); commands whose request_id
-- belongs to another command go no further; of the rest, the newest version per key wins, also
-- when a coalesced take brings several versions of one key at once. An `off` that would turn one
-- service too many of site $2 off is held by the guard (agent.guard_admit; $3 AGENT_GUARD_OFF_MIN,
-- NULL when the guard is off, $4 AGENT_GUARD_OFF_PERCENT, $5 AGENT_GUARD_WINDOW): it is not
-- accepted; a held command that a newer accepted command supersedes is made visible, to be read and
-- recorded as superseded. Returns ('r', request_id, owner version), ('d', device, service, version
-- in force: the newest accepted, ours or a newer one) and ('h', device, service, version in force,
-- the held version).
-- $1: the commands, a JSON array of columns: [[device...], [service...], [desired...], [version...],
-- [msg_id...], [request_id...], [released...]] (see reports.py, _columns).
WITH input AS (
    SELECT x.device, x.service, x.desired, x.version::bigint AS version, x.msg_id::bigint AS msg_id, x.request_id,
           x.released::boolean AS released
    FROM ROWS FROM (jsonb_array_elements_text($1::jsonb->0), jsonb_array_elements_text($1::jsonb->1),
                    jsonb_array_elements_text($1::jsonb->2), jsonb_array_elements_text($1::jsonb->3),
                    jsonb_array_elements_text($1::jsonb->4), jsonb_array_elements_text($1::jsonb->5),
                    jsonb_array_elements_text($1::jsonb->6))
        AS x(device, service, desired, version, msg_id, request_id, released)
), req AS (
    INSERT INTO agent.requests AS r (request_id, version, device, service)
    SELECT DISTINCT ON (request_id) request_id, version, device, service FROM input
    WHERE request_id IS NOT NULL ORDER BY request_id, version
    ON CONFLICT (request_id) DO UPDATE SET request_id = r.request_id
    RETURNING request_id, version
), fresh AS (
    SELECT DISTINCT ON (i.device, i.service) i.* FROM input i LEFT JOIN req ON req.request_id = i.request_id
    WHERE i.request_id IS NULL OR req.version = i.version
    ORDER BY i.device, i.service, i.version DESC, i.msg_id DESC
), held AS (
    SELECT g.device, g.service, g.version, g.in_force FROM agent.guard_admit($2::text, CASE WHEN $3::integer IS NOT NULL
        THEN (SELECT jsonb_agg(jsonb_build_object('device', f.device, 'service', f.service, 'version', f.version,
                                                  'released', f.released))
              FROM fresh f WHERE f.desired = 'off') END, $3::integer, $4::double precision, $5::double precision) g
), acc AS (
    INSERT INTO agent.service_state AS s (device, service, desired, desired_version, desired_at, last_msg_id,
                                          last_request_id, updated_at)
    SELECT f.device, f.service, f.desired, f.version, now(), f.msg_id, f.request_id, now() FROM fresh f
    WHERE NOT EXISTS (SELECT 1 FROM held h WHERE h.device = f.device AND h.service = f.service)
    ON CONFLICT (device, service) DO UPDATE SET
        desired         = CASE WHEN EXCLUDED.desired_version >= s.desired_version THEN EXCLUDED.desired
                               ELSE s.desired END,
        desired_at      = CASE WHEN EXCLUDED.desired_version > s.desired_version THEN now() ELSE s.desired_at END,
        desired_failed  = CASE WHEN EXCLUDED.desired_version >= s.desired_version THEN false
                               ELSE s.desired_failed END,
        last_msg_id     = CASE WHEN EXCLUDED.desired_version >= s.desired_version THEN EXCLUDED.last_msg_id
                               ELSE s.last_msg_id END,
        last_request_id = CASE WHEN EXCLUDED.desired_version >= s.desired_version THEN EXCLUDED.last_request_id
                               ELSE s.last_request_id END,
        desired_version = greatest(s.desired_version, EXCLUDED.desired_version),
        updated_at      = now()
    RETURNING device, service, desired_version
), unheld AS (   -- a held command a newer accepted one supersedes goes now, to end as superseded
    UPDATE pgmq.{q} m SET vt = clock_timestamp(), headers = m.headers || '{"guard": "superseded"}'::jsonb
    FROM acc
    WHERE EXISTS (SELECT 1 FROM pgmq.{q} h WHERE h.headers->>'guard' = 'held'
                  AND h.vt > clock_timestamp() + interval '50 years')
      AND m.vt > clock_timestamp() + interval '50 years' AND m.headers->>'guard' = 'held'
      AND (m.message->>'device') = acc.device AND m.message->>'service' = acc.service
      AND acc.desired_version > CASE WHEN m.headers->>'origin_msg_id' ~ '^[0-9]{1,18}$'
                                     THEN (m.headers->>'origin_msg_id')::bigint ELSE m.msg_id END
    RETURNING 1
)
SELECT 'r' AS kind, request_id AS a, NULL::text AS b, version, NULL::bigint AS held FROM req
UNION ALL
SELECT 'd', device, service, desired_version, NULL FROM acc
UNION ALL
SELECT 'h', device, service, in_force, version FROM held;

-- The guard against mass suspension, for `agentctl guard` (agent/cli/guard.py). A held command is
-- in its site's queue, invisible for a century, with the header guard = held.
-- name: guard_repair
-- Whether the guard lets reconciliation turn off one service of site $1 that drifted on ($2 device,
-- $3 service): the repair counts like a command's `off` ($4 AGENT_GUARD_OFF_MIN, NULL when the
-- guard is off, $5 percent, $6 window). True: go ahead.
SELECT NOT EXISTS (SELECT 1 FROM agent.guard_admit($1::text, CASE WHEN $4::integer IS NOT NULL THEN
    jsonb_build_array(jsonb_build_object('device', $2::text, 'service', $3::text, 'version', 0, 'repair', true))
    END, $4::integer, $5::double precision, $6::double precision));

-- name: guard_held
-- The held commands by device: how many, since when, and how many of them a newer command for their
-- key has superseded since (released, those end as superseded).
SELECT m.message->>'device' AS device, count(*) AS held, min(m.headers->>'held_at') AS held_since,
       min(m.enqueued_at) AS oldest_enqueued,
       count(*) FILTER (WHERE s.desired_version > CASE WHEN m.headers->>'origin_msg_id' ~ '^[0-9]{1,18}$'
                                                       THEN (m.headers->>'origin_msg_id')::bigint
                                                       ELSE m.msg_id END) AS superseded
FROM pgmq.{q} m
LEFT JOIN agent.service_state s ON s.device = m.message->>'device' AND s.service = m.message->>'service'
WHERE m.vt > clock_timestamp() + interval '50 years' AND m.headers->>'guard' = 'held'
GROUP BY 1 ORDER BY 1;

-- name: guard_window
-- Site $1 within the last $2 seconds: services turned off (the count the guard holds to its limit),
-- services on (what the percentage is of), and whether `guard release` lifted the limit.
SELECT (SELECT count(*) FROM agent.guard_offs o
        WHERE o.site = $1 AND o.at >= clock_timestamp() - make_interval(secs => $2)) AS turned_off,
       (SELECT count(*) FROM agent.service_state s JOIN agent.devices d ON d.id = s.device
        WHERE d.site = $1 AND (s.desired = 'on' OR s.observed = 'on' OR EXISTS (
            SELECT 1 FROM agent.guard_offs o WHERE o.device = s.device AND o.service = s.service
              AND o.at >= clock_timestamp() - make_interval(secs => $2)))) AS services_on,
       (SELECT g.lifted_until FROM agent.guard_sites g WHERE g.site = $1 AND g.lifted_until > clock_timestamp())
           AS lifted_until,
       (SELECT g.lifted_by FROM agent.guard_sites g WHERE g.site = $1 AND g.lifted_until > clock_timestamp())
           AS lifted_by;

-- name: guard_release
-- `agentctl guard release`: every held command of the queue is visible now (marked released, so the
-- guard lets it pass), the site's ($1) limit is lifted for the next $2 seconds, each release is
-- audited with who did it ($3: the OS user of agentctl, after the login role), and the site's agents
-- are woken ($4: the queue's insert channel).
WITH who AS (
    SELECT session_user || ' (os user ' || left($3::text, 64) || ')' AS name
), lift AS (
    INSERT INTO agent.guard_sites AS g (site, lifted_until, lifted_by)
    SELECT $1, clock_timestamp() + make_interval(secs => $2), who.name FROM who
    ON CONFLICT (site) DO UPDATE SET lifted_until = EXCLUDED.lifted_until, lifted_by = EXCLUDED.lifted_by
    RETURNING g.lifted_until
), go AS (
    UPDATE pgmq.{q} m SET vt = clock_timestamp(), headers = m.headers || '{"guard": "released"}'::jsonb
    WHERE m.vt > clock_timestamp() + interval '50 years' AND m.headers->>'guard' = 'held'
    RETURNING m.msg_id, m.message, m.headers
), ev AS (
    INSERT INTO agent.events (device, service, kind, msg_id, version, request_id, desired, error, agent_id, meta)
    SELECT left(g.message->>'device', 200), left(g.message->>'service', 200), 'released', g.msg_id,
           CASE WHEN g.headers->>'origin_msg_id' ~ '^[0-9]{1,18}$' THEN (g.headers->>'origin_msg_id')::bigint
                ELSE g.msg_id END,
           left(g.message->>'request_id', 200), left(g.message->>'state', 10), 'released by ' || who.name,
           'agentctl', jsonb_build_object('by', who.name)
    FROM go g, who
    RETURNING 1
)
SELECT (SELECT lifted_until FROM lift) AS lifted_until, (SELECT count(*) FROM ev) AS released,
       (SELECT name FROM who) AS who,
       (SELECT count(*) FROM (SELECT pg_notify($4::text, '')) n) AS notified;

-- name: guard_discard
-- `agentctl guard discard`: every held command of the queue ends here, never applied: archived (or
-- deleted, $2 false: AGENT_ARCHIVE=false) with a `discarded` event naming who did it ($1: the OS user).
WITH who AS (
    SELECT session_user || ' (os user ' || left($1::text, 64) || ')' AS name
), gone AS (
    DELETE FROM pgmq.{q} m
    WHERE m.vt > clock_timestamp() + interval '50 years' AND m.headers->>'guard' = 'held'
    RETURNING m.msg_id, m.vt, m.read_ct, m.enqueued_at, m.last_read_at, m.message, m.headers
), kept AS (
    INSERT INTO pgmq.{a} (msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers)
    SELECT msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers FROM gone WHERE $2::boolean
    RETURNING 1
), ev AS (
    INSERT INTO agent.events (device, service, kind, msg_id, version, request_id, desired, error, agent_id, meta)
    SELECT left(g.message->>'device', 200), left(g.message->>'service', 200), 'discarded', g.msg_id,
           CASE WHEN g.headers->>'origin_msg_id' ~ '^[0-9]{1,18}$' THEN (g.headers->>'origin_msg_id')::bigint
                ELSE g.msg_id END,
           left(g.message->>'request_id', 200), left(g.message->>'state', 10), 'discarded by ' || who.name,
           'agentctl', jsonb_build_object('by', who.name)
    FROM gone g, who
    RETURNING 1
)
SELECT (SELECT count(*) FROM ev) AS discarded, (SELECT count(*) FROM kept) AS archived, (SELECT name FROM who) AS who;
