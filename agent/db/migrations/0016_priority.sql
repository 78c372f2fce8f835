-- 0016: restores first. The agents read a queue's high-priority messages before the others
-- (agent/executor/priority.py: the `priority` header, else `on` is high); a partial index on each
-- queue finds them without scanning the rest. `agentctl db init` creates it for the queue it
-- initialises; here it is built for every queue agent.sites records. Expand only: an agent of an
-- older schema reads with pgmq.read and ignores the index. Building it holds the queue's writes back
-- for as long as it takes (milliseconds for thousands of messages).
DO $$
DECLARE
    q text;
BEGIN
    FOR q IN SELECT s.queue FROM agent.sites s JOIN pgmq.meta m ON m.queue_name = s.queue ORDER BY s.queue LOOP
        EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON pgmq.%I (msg_id) WHERE '
                       'coalesce(headers->>''priority'' = ''high'' OR (headers->>''priority'' IS NULL AND '
                       'message->>''state'' = ''on''), false)', 'q_' || q || '_high_idx', 'q_' || q);
    END LOOP;
END $$;
