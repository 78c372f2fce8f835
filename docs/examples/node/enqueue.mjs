// A producer in Node.js with node-postgres: enqueue one command in a transaction of your own, then
// follow it to its end (docs/contract.md, "Following the outcome").
//
//   npm install            # pg, from package.json
//   DATABASE_URL=postgresql://webhook@db.example/agent node enqueue.mjs router-1 pppoe:alice on invoice-42-paid
//
// Prints one JSON line: {"msg_id", "outcome" (the agent_outcome notification), "status" (agent.command_status)}.
// Exit status: 0 in effect (verified or refreshed); 1 settled otherwise (superseded, duplicate, expired,
// dead_lettered: see "error"); 2 refused, fix the call (SQLSTATE 22023); 3 unknown device, drop the
// command (P0002); 75 try again later (55000: the device's site has no queue yet, an operator's fix;
// or no outcome within WAIT_MS, default 30000: the command stays queued and is done later).
import pg from 'pg';

const [device, service, state, requestId = null] = process.argv.slice(2);
const waitMs = Number(process.env.WAIT_MS ?? 30000);
const REMEDY = { '22023': [2, 'fix the call'], P0002: [3, 'drop the command'], '55000': [75, 'try again later'] };

// LISTEN needs a connection of its own that stays open: a pool hands its connections to other
// queries, and PgBouncer in transaction mode forgets a LISTEN when the transaction ends.
const listener = new pg.Client({ connectionString: process.env.DATABASE_URL });
const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL, max: 2 });
const outcomes = new Map(); // version (as a string) -> notification payload
let arrived = () => {};
listener.on('notification', (msg) => {
  const payload = JSON.parse(msg.payload);
  outcomes.set(String(payload.version), payload);
  arrived();
});
listener.on('error', (err) => console.error(`listener lost (${err.message}): asking agent.command_status instead`));

async function enqueue() {
  const client = await pool.connect();
  try {
    await client.query('BEGIN');
    // ... the producer's own writes (the invoice marked paid) go here: they commit with the command, or neither does
    const { rows } = await client.query(
      'SELECT agent.enqueue($1, $2, $3, request_id => $4) AS msg_id', [device, service, state, requestId]);
    await client.query('COMMIT');
    return rows[0].msg_id; // bigint arrives as a string: keep it one (ids may pass 2^53)
  } catch (err) {
    await client.query('ROLLBACK');
    throw err;
  } finally {
    client.release();
  }
}

async function outcomeOf(msgId) {
  const deadline = Date.now() + waitMs;
  while (!outcomes.has(msgId) && Date.now() < deadline) {
    await new Promise((resolve) => {
      const timer = setTimeout(resolve, Math.min(1000, Math.max(0, deadline - Date.now())));
      arrived = () => { clearTimeout(timer); resolve(); };
    });
    // a notification lost with its connection is not lost for good: the status says it too
    const { rows } = await pool.query('SELECT status FROM agent.command_status($1)', [msgId]);
    if (rows[0].status === 'settled') break;
  }
  return outcomes.get(msgId) ?? null;
}

async function main() {
  await listener.connect();
  await listener.query('LISTEN agent_outcome'); // before the command commits, so its outcome cannot be missed
  let msgId;
  try {
    msgId = await enqueue();
  } catch (err) {
    const [code, remedy] = REMEDY[err.code] ?? [1, 'unexpected'];
    console.error(`refused (${err.code}: ${remedy}): ${err.message}${err.hint ? ` (${err.hint})` : ''}`);
    return code;
  }
  const outcome = await outcomeOf(msgId);
  const { rows } = await pool.query('SELECT * FROM agent.command_status($1)', [msgId]);
  const status = rows[0];
  console.log(JSON.stringify({ msg_id: msgId, outcome, status }));
  if (status.status !== 'settled') return 75;
  return ['verified', 'refreshed'].includes(status.kind) ? 0 : 1;
}

main()
  .then((code) => { process.exitCode = code; })
  .catch((err) => { console.error(err); process.exitCode = 1; })
  .finally(() => Promise.allSettled([listener.end(), pool.end()]));
