// Publish a job and cancel another from Node.js with node-redis: no streamflow code needed.
// Follows docs/protocol.md (wire protocol version 1).
//
//   npm ci && node publish.mjs [REDIS_URL] [NAMESPACE]   # defaults: redis://127.0.0.1:6379/0, sf
//
// Serve the roles with: streamflow worker --app examples.outside_python.app:app
import { randomBytes } from "node:crypto";
import { createClient } from "redis";

const [url = "redis://127.0.0.1:6379/0", ns = "sf"] = process.argv.slice(2);

// streamflow/lua/cancel.lua, verbatim (the example's test checks that they are the same).
const CANCEL_LUA = `#!lua
-- Cancel a task or a message: set its persistent marker, index it, then announce it on the
-- signals stream. The marker makes the cancel outlive the broadcast: work queued, waiting for a
-- retry, adopted later, or read by a worker started after the signal is still never started.
-- The index lets a starting worker find the live markers without scanning the keyspace.
-- KEYS[1] signals stream, KEYS[2] cancel marker, KEYS[3] cancel index (optional: callers of
-- the two-key form set no index entry, and workers started later do not see the marker)
-- ARGV[1] signal JSON, ARGV[2] marker TTL ms, ARGV[3] signals stream max length,
-- ARGV[4] index member ('<target>:<target id>', with KEYS[3])
-- Returns the signal's stream entry id.
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if KEYS[3] then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  -- pcall: a key of another type at the index's name (anyone with write access may make one)
  -- must not stop a cancel; workers warn about it when they load the index.
  redis.pcall('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[4])
  redis.pcall('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'signal', ARGV[1])
`;
const MARKER_TTL_MS = 7 * 24 * 3600 * 1000;

/** A message id: 32 lowercase hex digits, like the ones streamflow makes. */
const newId = () => randomBytes(16).toString("hex");

/** Poll `check` every 50 ms until it returns something truthy; throw after 30 s. */
async function waitFor(what, check) {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const found = await check();
    if (found) return found;
    if (Date.now() > deadline) throw new Error(`gave up waiting for ${what} (is a worker running?)`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

// No reconnects and no offline queue: a command is sent once or fails. Never resend an XADD
// whose reply was lost: it may have run, and a second one publishes the job twice.
const client = createClient({
  url,
  disableOfflineQueue: true,
  socket: { reconnectStrategy: false },
});
client.on("error", (err) => console.error(`redis: ${err.message}`));
await client.connect();

try {
  /**
   * Publish one job to `role`: one XADD of one field, `message`, holding the envelope.
   * `headers` (optional) is metadata the handler reads as ctx.headers: string names and values.
   */
  async function publish(role, payload, headers) {
    const job = {
      protocol: 1,
      kind: "job",
      id: newId(),
      role,
      payload,
      attempt: 1,
      created_at_ms: Date.now(),
      ...(headers && { headers }),
    };
    const stream = `${ns}:{role:${role}}:stream`;
    const entry = await client.xAdd(stream, "*", { message: JSON.stringify(job) });
    console.log(`published ${role} ${job.id} (entry ${entry})`);
    return { id: job.id, stream, entry };
  }

  await publish(
    "greet",
    { name: "node" },
    {
      traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
      "correlation-id": "node-1",
    },
  );
  const slow = await publish("slow", { steps: 600, step_seconds: 0.1 });

  // A worker has taken the job once its entry is pending in the role's group, `workers`.
  await waitFor(`a worker to take ${slow.id}`, async () => {
    try {
      return (await client.xPendingRange(slow.stream, "workers", slow.entry, slow.entry, 1)).length;
    } catch (err) {
      if (String(err.message).startsWith("NOGROUP")) return 0; // no worker has started yet
      throw err;
    }
  });

  // Cancel it by message id with cancel.lua: the persistent marker, its entry in the cancel
  // index (so workers started later find it) and the signal, in one step.
  const signal = {
    protocol: 1,
    kind: "cancel",
    id: newId(),
    target: "message",
    target_id: slow.id,
    reason: "cancelled from Node.js",
    requested_by: "publish.mjs",
    created_at_ms: Date.now(),
  };
  await client.eval(CANCEL_LUA, {
    keys: [
      `${ns}:{signals}:stream`,
      `${ns}:{signals}:cancel:message:${slow.id}`,
      `${ns}:{signals}:cancels`,
    ],
    arguments: [JSON.stringify(signal), String(MARKER_TTL_MS), "10000", `message:${slow.id}`],
  });

  // Each worker that stopped (or refused) the job lists it in its report on the signal.
  const consumer = await waitFor(`a worker to report ${slow.id} stopped`, async () => {
    const reports = await client.hGetAll(`${ns}:{signals}:report:${signal.id}`);
    return Object.keys(reports).find((name) =>
      JSON.parse(reports[name]).stopped.includes(slow.id),
    );
  });
  console.log(`cancelled slow ${slow.id} (stopped on ${consumer})`);
} finally {
  await client.close();
}
