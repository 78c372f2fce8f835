-- Every statement the agent sends, by name. Parameters are always bound ($1...).
-- {q}, {a}, {dq}, {da} are the quoted identifiers of the queue's and the DLQ's PGMQ tables
-- (pgmq.q_<queue>, pgmq.a_<queue>), filled in once from the validated queue name: PGMQ's own
-- functions have no read_ct fence, so the hot path touches its tables directly.

-- name: read
SELECT msg_id, read_ct, enqueued_at, message::text AS message, headers::text AS headers
FROM pgmq.read($1::text, $2::integer, $3::integer);

-- name: load_devices
SELECT id, driver, address, site, options::text AS options, credential
FROM agent.devices WHERE site = $1 ORDER BY id;

-- name: archive_fenced
WITH gone AS (
    DELETE FROM pgmq.{q} m
    USING unnest($1::bigint[], $2::integer[]) AS x(id, rc)
    WHERE m.msg_id = x.id AND m.read_ct = x.rc
    RETURNING m.msg_id, m.vt, m.read_ct, m.enqueued_at, m.last_read_at, m.message, m.headers
)
INSERT INTO pgmq.{a} (msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers)
SELECT msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers FROM gone
RETURNING msg_id;

-- name: dead_letter
SELECT x.id, pgmq.send($1::text, a.message, coalesce(a.headers, '{}'::jsonb) || x.h) AS dlq_id
FROM unnest($2::bigint[], $3::jsonb[]) AS x(id, h)
JOIN pgmq.{a} a ON a.msg_id = x.id;

-- name: retry_later
UPDATE pgmq.{q} m SET vt = clock_timestamp() + make_interval(secs => x.delay)
FROM unnest($1::bigint[], $2::integer[], $3::double precision[]) AS x(id, rc, delay)
WHERE m.msg_id = x.id AND m.read_ct = x.rc;

-- name: extend_leases
UPDATE pgmq.{q} SET vt = clock_timestamp() + make_interval(secs => $2::integer)
WHERE msg_id = ANY($1::bigint[]);

-- name: release
UPDATE pgmq.{q} m SET vt = clock_timestamp()
FROM unnest($1::bigint[], $2::integer[]) AS x(id, rc)
WHERE m.msg_id = x.id AND m.read_ct = x.rc;

-- name: upsert_states
-- Rows arrive as one JSON array (jsonb_to_recordset): far cheaper to encode than a dozen typed arrays.
INSERT INTO agent.service_state AS s (
    device, service, desired, desired_version, desired_at, observed, observed_at,
    applied_at, verified_at, last_error, last_error_at, last_msg_id, last_request_id, meta, updated_at)
SELECT x.device, x.service, x.desired, coalesce(x.version, 0), CASE WHEN x.desired IS NOT NULL THEN now() END,
       coalesce(x.observed, 'unknown'), x.observed_at, x.applied_at, x.verified_at,
       x.error, CASE WHEN x.error IS NOT NULL THEN now() END, x.msg_id, x.request_id, x.meta, now()
FROM jsonb_to_recordset($1::jsonb)
     AS x(device text, service text, desired text, version bigint, observed text, observed_at timestamptz,
          applied_at timestamptz, verified_at timestamptz, error text, msg_id bigint, request_id text, meta jsonb)
ON CONFLICT (device, service) DO UPDATE SET
    desired         = CASE WHEN EXCLUDED.desired IS NOT NULL AND EXCLUDED.desired_version >= s.desired_version
                           THEN EXCLUDED.desired ELSE s.desired END,
    desired_at      = CASE WHEN EXCLUDED.desired IS NOT NULL AND EXCLUDED.desired_version > s.desired_version
                           THEN now() ELSE s.desired_at END,
    desired_version = CASE WHEN EXCLUDED.desired IS NOT NULL AND EXCLUDED.desired_version >= s.desired_version
                           THEN EXCLUDED.desired_version ELSE s.desired_version END,
    observed        = CASE WHEN EXCLUDED.observed_at IS NOT NULL THEN EXCLUDED.observed ELSE s.observed END,
    observed_at     = coalesce(EXCLUDED.observed_at, s.observed_at),
    applied_at      = coalesce(EXCLUDED.applied_at, s.applied_at),
    verified_at     = coalesce(EXCLUDED.verified_at, s.verified_at),
    last_error      = CASE WHEN EXCLUDED.last_error IS NOT NULL THEN EXCLUDED.last_error
                           WHEN EXCLUDED.verified_at IS NOT NULL THEN NULL ELSE s.last_error END,
    last_error_at   = CASE WHEN EXCLUDED.last_error IS NOT NULL THEN now()
                           WHEN EXCLUDED.verified_at IS NOT NULL THEN NULL ELSE s.last_error_at END,
    last_msg_id     = coalesce(EXCLUDED.last_msg_id, s.last_msg_id),
    last_request_id = coalesce(EXCLUDED.last_request_id, s.last_request_id),
    meta            = coalesce(EXCLUDED.meta, s.meta),
    updated_at      = now();

-- name: insert_events
INSERT INTO agent.events (device, service, kind, msg_id, version, request_id, desired, observed,
                          attempt, duration_ms, error, agent_id, meta)
SELECT x.device, x.service, x.kind, x.msg_id, x.version, x.request_id, x.desired, x.observed,
       x.attempt, x.duration_ms, x.error, $2, x.meta
FROM jsonb_to_recordset($1::jsonb)
     AS x(device text, service text, kind text, msg_id bigint, version bigint, request_id text, desired text,
          observed text, attempt integer, duration_ms double precision, error text, meta jsonb);

-- name: queue_lock
SELECT pgmq.acquire_queue_lock($1::text);

-- name: notify_enabled
SELECT EXISTS (SELECT 1 FROM pgmq.notify_insert_throttle WHERE queue_name = $1::text)
   AND EXISTS (SELECT 1 FROM pg_trigger
               WHERE tgname = 'trigger_notify_queue_insert_listeners'
                 AND tgrelid = to_regclass(format('pgmq.%I', 'q_' || $1::text)));

-- name: enable_notify
SELECT pgmq.enable_notify_insert($1::text, $2::integer);

-- name: schema_version
SELECT coalesce(max(version), 0) FROM agent.schema_version;

-- name: queue_exists
SELECT count(*) = 2 FROM pgmq.meta WHERE queue_name IN ($1::text, $2::text);

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
SELECT min(vt) - clock_timestamp() AS wait FROM pgmq.{q}
WHERE vt > clock_timestamp() AND NOT (msg_id = ANY($1::bigint[]));

-- name: accept_requests
-- Record each request_id with the command that first carried it; return the owner of each.
INSERT INTO agent.requests AS r (request_id, version, device, service)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[])
ON CONFLICT (request_id) DO UPDATE SET request_id = r.request_id
RETURNING request_id, version;

-- name: accept_desired
-- Write-ahead of intent, before any device is touched: the newest version wins. Returns the
-- version in force afterwards: ours if accepted, a newer one if this command is superseded.
INSERT INTO agent.service_state AS s (device, service, desired, desired_version, desired_at, last_msg_id,
                                      last_request_id, updated_at)
SELECT x.device, x.service, x.desired, x.version, now(), x.msg_id, x.request_id, now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[])
     AS x(device, service, desired, version, msg_id, request_id)
ON CONFLICT (device, service) DO UPDATE SET
    desired         = CASE WHEN EXCLUDED.desired_version >= s.desired_version THEN EXCLUDED.desired ELSE s.desired END,
    desired_at      = CASE WHEN EXCLUDED.desired_version > s.desired_version THEN now() ELSE s.desired_at END,
    last_msg_id     = CASE WHEN EXCLUDED.desired_version >= s.desired_version THEN EXCLUDED.last_msg_id ELSE s.last_msg_id END,
    last_request_id = CASE WHEN EXCLUDED.desired_version >= s.desired_version THEN EXCLUDED.last_request_id ELSE s.last_request_id END,
    desired_version = greatest(s.desired_version, EXCLUDED.desired_version),
    updated_at      = now()
RETURNING device, service, desired_version;

-- name: heartbeat
INSERT INTO agent.agents AS a (agent_id, site, queue, host, pid, version, started_at, last_heartbeat, state,
                               status, last_cycle_at, last_cycle_ms, stopped_at, figures)
VALUES ($1, $2, $3, $4, $5, $6, $7, now(), $8, $9, $10, $11, CASE WHEN $8 = 'stopped' THEN now() END, $12::jsonb)
ON CONFLICT (agent_id) DO UPDATE SET
    site = EXCLUDED.site, queue = EXCLUDED.queue, host = EXCLUDED.host, pid = EXCLUDED.pid,
    version = EXCLUDED.version, started_at = EXCLUDED.started_at, last_heartbeat = now(),
    state = EXCLUDED.state, status = EXCLUDED.status, last_cycle_at = EXCLUDED.last_cycle_at,
    last_cycle_ms = EXCLUDED.last_cycle_ms, stopped_at = EXCLUDED.stopped_at, figures = EXCLUDED.figures;

-- name: queue_stats
-- Cheap sample for metrics and status: counts are capped, the oldest message is found by msg_id.
SELECT (SELECT count(*) FROM (SELECT 1 FROM pgmq.{q} LIMIT $1) s) AS depth,
       (SELECT extract(epoch FROM clock_timestamp() - enqueued_at) FROM pgmq.{q} ORDER BY msg_id LIMIT 1) AS oldest,
       (SELECT count(*) FROM (SELECT 1 FROM pgmq.{dq} LIMIT $1) s) AS dlq_depth,
       (SELECT extract(epoch FROM clock_timestamp() - enqueued_at) FROM pgmq.{dq} ORDER BY msg_id LIMIT 1) AS dlq_oldest;

-- name: drifted
SELECT device, service, desired, observed, last_error FROM agent.service_state
WHERE desired IS NOT NULL AND desired IS DISTINCT FROM observed ORDER BY device, service LIMIT $1;

-- name: fleet
SELECT agent_id, site, queue, host, pid, version, started_at, last_heartbeat, state, status,
       extract(epoch FROM now() - last_heartbeat) AS heartbeat_age, figures::text AS figures
FROM agent.agents WHERE $1::text IS NULL OR site = $1 ORDER BY site, agent_id;

-- name: park
-- Put a message back without it counting as an attempt: `bounces` in its headers is subtracted
-- from read_ct when the executor counts attempts.
UPDATE pgmq.{q} m SET vt = clock_timestamp() + make_interval(secs => x.delay),
       headers = coalesce(m.headers, '{}'::jsonb)
                 || jsonb_build_object('bounces', coalesce((m.headers->>'bounces')::integer, 0) + 1)
FROM unnest($1::bigint[], $2::integer[], $3::double precision[]) AS x(id, rc, delay)
WHERE m.msg_id = x.id AND m.read_ct = x.rc;
