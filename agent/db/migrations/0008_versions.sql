-- 0008: versions comparable across queues, and one running process per agent id. Expand only: an
-- agent of schema 5 to 7 keeps working against it (min_agent_schema stays 5).
-- * Every agent queue takes its msg_ids from one sequence, agent.msg_id_seq (a BEFORE INSERT
--   trigger, installed by `db init` on each site's queue through agent.share_msg_ids): a command's
--   version is its msg_id, and service_state keeps one version per (device, service), so a device
--   moved to another site, or a site given a new queue, no longer finds its commands "superseded"
--   by the ids of the queue it came from. The queue's own sequence still counts (pgmq.metrics reads
--   it) and is kept ahead of the ids given: agents before schema 8 refuse a msg_id above it as forged.
--   DLQs keep their own sequence: a dead letter carries its version in origin_msg_id. An insert
--   that names its msg_id (OVERRIDING SYSTEM VALUE) gets one from the sequence all the same: no id
--   is forged out of order; a row put back by hand keeps its version in origin_msg_id, as a replay does.
-- * agent.agents records each running process (instance, host_id), and device claims are held by
--   an instance, not by an agent id: two processes started with one AGENT_AGENT_ID never hold one
--   device together, and the second is refused at start.
CREATE SEQUENCE agent.msg_id_seq AS bigint;

-- Start above every id given so far (any queue's, any version recorded), so that a command sent
-- after the upgrade is newer than every command before it, whichever queue that came from.
DO $$
DECLARE
    top bigint := greatest((SELECT max(desired_version) FROM agent.service_state),
                           (SELECT max(version) FROM agent.requests), 0);
    seq regclass;
BEGIN
    FOR seq IN SELECT to_regclass(format('pgmq.%I', 'q_' || m.queue_name || '_msg_id_seq')) FROM pgmq.meta m LOOP
        IF seq IS NOT NULL THEN
            top := greatest(top, pg_sequence_last_value(seq));
        END IF;
    END LOOP;
    PERFORM setval('agent.msg_id_seq', greatest(top, 1), top > 0);
END $$;

-- The queue's msg_id from the shared sequence. TG_ARGV[0]: the queue's own msg_id sequence, kept
-- at least as far as the ids given (a million ahead, so that it is set rarely and concurrent inserts
-- that set it out of order still leave it above every id): agents before schema 8 compare a read
-- msg_id with it. With the owner's rights: an agent may not set the sequence, and a trigger function
-- cannot be called directly.
CREATE FUNCTION agent.take_msg_id() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    own regclass := TG_ARGV[0]::regclass;
BEGIN
    NEW.msg_id := nextval('agent.msg_id_seq');
    IF NEW.msg_id > coalesce(pg_sequence_last_value(own), 0) THEN
        PERFORM setval(own, NEW.msg_id + 1000000);
    END IF;
    RETURN NEW;
END $$;

-- Make the queue take its ids from agent.msg_id_seq (idempotent; true when installed now). Run by
-- `db init` for the site's queue, as the queue's owner; DLQs are not shared.
CREATE FUNCTION agent.share_msg_ids(queue text) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    tbl regclass := to_regclass(format('pgmq.%I', 'q_' || queue));
    own text := format('pgmq.%I', 'q_' || queue || '_msg_id_seq');
    top bigint;
BEGIN
    IF tbl IS NULL OR queue ~ '_dlq$' THEN
        RAISE EXCEPTION 'agent.share_msg_ids: % is not an agent queue', quote_nullable(queue) USING ERRCODE = '22023';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname = 'agent_msg_id') THEN
        RETURN false;
    END IF;
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', tbl);
    -- A queue made without the trigger (by an older agentctl) may hold ids above the shared
    -- sequence: advance it past them, one nextval at a time (setval could race other queues' inserts).
    top := coalesce(pg_sequence_last_value(own::regclass), 0);
    WHILE coalesce(pg_sequence_last_value('agent.msg_id_seq'), 0) < top LOOP
        PERFORM nextval('agent.msg_id_seq');
    END LOOP;
    EXECUTE format('CREATE TRIGGER agent_msg_id BEFORE INSERT ON %s FOR EACH ROW EXECUTE FUNCTION '
                   'agent.take_msg_id(%L)', tbl, own);
    RETURN true;
END $$;

DO $$
DECLARE
    q text;
BEGIN
    FOR q IN SELECT m.queue_name FROM pgmq.meta m
             WHERE m.queue_name !~ '_dlq$'
               AND EXISTS (SELECT 1 FROM pgmq.meta d WHERE d.queue_name = m.queue_name || '_dlq') LOOP
        PERFORM agent.share_msg_ids(q);
    END LOOP;
END $$;

-- The running process behind an agent id (a random id per start) and where it runs (host and
-- PID namespace: only there can its pid be looked up). NULL: written by an agent before schema 8.
ALTER TABLE agent.agents ADD COLUMN instance text CHECK (length(instance) <= 64);
ALTER TABLE agent.agents ADD COLUMN host_id text CHECK (length(host_id) <= 300);
ALTER TABLE agent.device_claims ADD COLUMN instance text CHECK (length(instance) <= 64);
