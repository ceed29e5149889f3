// Submit a DAG task from Node.js with node-redis, and read what became of it: no streamflow
// code needed. Follows docs/protocol.md (wire protocol version 1, "Submitting a task").
//
//   npm ci && node submit.mjs [REDIS_URL] [NAMESPACE]   # defaults: redis://127.0.0.1:6379/0, sf
//
// Needs a coordinator (streamflow coordinator) and a worker serving the graph's roles
// (streamflow worker --app examples.outside_python.app:app).
import { randomBytes } from "node:crypto";
import { createClient } from "redis";

const [url = "redis://127.0.0.1:6379/0", ns = "sf"] = process.argv.slice(2);

/** A task id of our own choosing: a retried XADD of the same id creates the task once. */
const newId = (prefix) => `${prefix}-${randomBytes(8).toString("hex")}`;

/** Poll `check` every 50 ms until it returns something truthy; throw after 30 s. */
async function waitFor(what, check) {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const found = await check();
    if (found) return found;
    if (Date.now() > deadline) throw new Error(`gave up waiting for ${what} (is a coordinator running?)`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

const client = createClient({ url, disableOfflineQueue: true, socket: { reconnectStrategy: false } });
client.on("error", (err) => console.error(`redis: ${err.message}`));
await client.connect();

/** Submit `graph` under `id`: one XADD of two fields, `id` and `submission`. */
async function submit(id, graph, params = {}) {
  const submission = { protocol: 1, kind: "submission", graph, params };
  await client.xAdd(`${ns}:{tasks}:submissions`, "*", { id, submission: JSON.stringify(submission) });
  // A coordinator answers under the id: accepted (the task runs) or rejected, every problem listed.
  const raw = await waitFor(`the outcome of ${id}`, () => client.get(`${ns}:{tasks}:submission:${id}`));
  return JSON.parse(raw);
}

try {
  // Two greetings, the second once the first has succeeded.
  const graph = {
    name: "greetings",
    nodes: [
      { id: "first", role: "greet", params: { name: "node task" } },
      { id: "second", role: "greet", params: { name: "node task, again" } },
    ],
    edges: [{ from: "first", to: "second" }],
  };
  const taskId = newId("greetings");
  const accepted = await submit(taskId, graph);
  console.log(`${accepted.state} ${taskId}`);

  // The task's state is JSON in the field `task` of its state hash.
  const state = await waitFor(`task ${taskId} to end`, async () => {
    const raw = await client.hGet(`${ns}:{task:${taskId}}:state`, "task");
    const task = raw && JSON.parse(raw);
    return task && ["succeeded", "failed", "cancelled"].includes(task.state) && task.state;
  });
  console.log(`task ${taskId} ${state}`);

  // An invalid graph: a role nobody serves, and an edge to a node that does not exist.
  const badId = newId("invalid");
  const rejected = await submit(badId, {
    nodes: [{ id: "a", role: "nobody-serves-this" }],
    edges: [{ from: "a", to: "ghost" }],
  });
  console.log(`${rejected.state} ${badId}`);
  for (const problem of rejected.problems) console.log(`  problem: ${problem}`);
} finally {
  await client.close();
}
