-- 0013: event kinds are added, never restated. Expand only: agents of schema 5 and newer keep working
-- (min_agent_schema stays 5).
-- * agent.allow_event_kinds(kinds...) widens the check on agent.events.kind by the kinds given,
--   keeping every kind it allows already: a migration adds its own kinds with it, so two migrations
--   written side by side cannot drop each other's (restating the whole list did).
-- * `policy_missing`: a reconcile run found a suspension policy that blocks nobody (an address list
--   no enabled firewall rule uses, a RADIUS group without a policy): one event per device and problem.
CREATE FUNCTION agent.allow_event_kinds(VARIADIC kinds text[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    have text[];
    listed text;
BEGIN
    SELECT coalesce(array_agg(DISTINCT m[1]), '{}') INTO have
    FROM pg_constraint c, regexp_matches(pg_get_constraintdef(c.oid), '''([a-z_]+)''', 'g') AS m
    WHERE c.conrelid = 'agent.events'::regclass AND c.conname = 'events_kind_check';
    SELECT string_agg(quote_literal(k), ', ' ORDER BY k) INTO listed
    FROM (SELECT DISTINCT k FROM unnest(have || kinds) AS k) AS u;
    ALTER TABLE agent.events DROP CONSTRAINT IF EXISTS events_kind_check;
    -- an ARRAY of literals, as the migrations before wrote it (pg_get_constraintdef shows each kind
    -- quoted, which is how the next call reads them back); the old rows all satisfy the wider check:
    -- NOT VALID spares a scan of the audit log
    EXECUTE format('ALTER TABLE agent.events ADD CONSTRAINT events_kind_check CHECK (kind IN (%s)) NOT VALID',
                   listed);
END $$;
REVOKE ALL ON FUNCTION agent.allow_event_kinds(text[]) FROM PUBLIC;

SELECT agent.allow_event_kinds('policy_missing');
