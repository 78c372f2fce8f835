-- 0014: a guard against mass suspension. Expand only: agents of schema 5 to 13 keep working against
-- it (min_agent_schema stays 5); they do not hold anything.
-- * agent.guard_offs: the services of a site turned off, each with the last time it was admitted to
--   be turned off; the sliding window (AGENT_GUARD_WINDOW) is `at` within it.
-- * agent.guard_sites: one row per site, locked while an agent decides (so the count is exact when
--   several agents and lanes decide at once), and where `agentctl guard release` lifts the limit.
-- * agent.guard_admit: the decision, called by the agents' acceptance statement.
-- * New event kinds: `held` (an `off` held by the guard), `released` and `discarded` (an operator's
--   decision on one, with who made it).
CREATE TABLE agent.guard_sites (
    site         text PRIMARY KEY CHECK (length(site) BETWEEN 1 AND 64 AND site !~ '[\x01-\x1f\x7f-\x9f]'),
    lifted_until timestamptz,   -- `guard release`: the limit does not apply before this
    lifted_by    text
);

CREATE TABLE agent.guard_offs (
    device  text NOT NULL,
    service text NOT NULL,
    site    text NOT NULL,
    at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device, service)
);
CREATE INDEX guard_offs_site_at_idx ON agent.guard_offs (site, at);

-- The new event kinds (agent.allow_event_kinds, 0012: added, none restated); `discarded` settles a
-- command (agent.final_kind, 0011: command_status, agent_outcome and batch counts follow it).
SELECT agent.allow_event_kinds('held', 'released', 'discarded');
CREATE OR REPLACE FUNCTION agent.final_kind(kind text) RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT kind IN ('verified', 'refreshed', 'superseded', 'duplicate', 'expired', 'dead_lettered', 'discarded')
$$;

-- Which of these `off` commands of site `site` the guard holds. keys: [{device, service, version,
-- released, repair}], at most one per (device, service), the newest of its take. Only a turn-off counts: a key
-- whose desired state in force is already `off`, or newer than the command (it is superseded), is
-- never held, unless it is a reconciliation's repair (`repair`: the device has it on, the repair
-- turns it off); nor is a key already turned off within the window (it adds nothing to the count), a
-- command an operator released, or any command while the site's limit is lifted. The others are
-- admitted in version order while the site's count of distinct services turned off since
-- now - window_s stays within greatest(off_min, off_percent % of the site's services on), where a
-- service is on if its desired state is on or it was last observed on, or it was turned off within
-- the window (so the limit does not shrink as the window fills). Admitted turn-offs are recorded in
-- the window. Returns the held keys with the version in force for each (0: none).
-- The site's row is locked first and every later statement takes a fresh snapshot, so agents that
-- decide at once are counted one after the other, each seeing what the others admitted.
CREATE FUNCTION agent.guard_candidates(keys jsonb, cutoff timestamptz)
RETURNS TABLE (device text, service text, version bigint, released boolean, in_force bigint)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT k.device, k.service, k.version, coalesce(k.released, false), coalesce(s.desired_version, 0)
    FROM jsonb_to_recordset(keys) AS k(device text, service text, version bigint, released boolean, repair boolean)
    LEFT JOIN agent.service_state s ON s.device = k.device AND s.service = k.service
    WHERE (coalesce(k.repair, false)
           OR coalesce(s.desired_version, 0) <= k.version AND s.desired IS DISTINCT FROM 'off')
      AND NOT EXISTS (SELECT 1 FROM agent.guard_offs o
                      WHERE o.device = k.device AND o.service = k.service AND o.at >= cutoff)
$$;

CREATE FUNCTION agent.guard_admit(site text, keys jsonb, off_min integer, off_percent double precision,
                                  window_s double precision)
RETURNS TABLE (device text, service text, version bigint, in_force bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    cutoff  timestamptz := clock_timestamp() - make_interval(secs => window_s);
    lifted  boolean;
    counted integer;
    wanted  integer;
    base    integer;
    room    bigint := 9223372036854775807;
BEGIN
    IF keys IS NULL OR jsonb_typeof(keys) <> 'array' OR jsonb_array_length(keys) = 0 THEN
        RETURN;
    END IF;
    INSERT INTO agent.guard_sites AS g (site) VALUES (guard_admit.site) ON CONFLICT DO NOTHING;
    SELECT coalesce(g.lifted_until > clock_timestamp(), false) INTO lifted
    FROM agent.guard_sites g WHERE g.site = guard_admit.site FOR UPDATE;
    IF NOT lifted AND off_percent < 100 THEN
        SELECT count(*) INTO counted FROM agent.guard_offs o WHERE o.site = guard_admit.site AND o.at >= cutoff;
        SELECT count(*) INTO wanted FROM agent.guard_candidates(keys, cutoff) c WHERE NOT c.released;
        room := wanted;
        IF counted + wanted > off_min THEN
            SELECT count(*) INTO base FROM agent.service_state s JOIN agent.devices d ON d.id = s.device
            WHERE d.site = guard_admit.site AND (s.desired = 'on' OR s.observed = 'on' OR EXISTS (
                SELECT 1 FROM agent.guard_offs o WHERE o.device = s.device AND o.service = s.service
                  AND o.at >= cutoff));
            room := greatest(0, greatest(off_min, floor(base * off_percent / 100)::integer) - counted);
        END IF;
    END IF;
    RETURN QUERY
    WITH decided AS (
        SELECT c.*, NOT c.released AND row_number() OVER (PARTITION BY c.released
                                                          ORDER BY c.version, c.device, c.service) > room AS held
        FROM agent.guard_candidates(keys, cutoff) c
    ), admitted AS (
        INSERT INTO agent.guard_offs AS o (device, service, site, at)
        SELECT d.device, d.service, guard_admit.site, clock_timestamp() FROM decided d WHERE NOT d.held
        ON CONFLICT ON CONSTRAINT guard_offs_pkey DO UPDATE SET site = EXCLUDED.site, at = EXCLUDED.at
        RETURNING 1
    )
    SELECT d.device, d.service, d.version, d.in_force FROM decided d WHERE d.held;
END $$;
