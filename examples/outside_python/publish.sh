#!/bin/sh
# Publish a job and cancel another with plain redis-cli commands: no streamflow code needed.
# Follows docs/protocol.md (wire protocol version 1).
#
#   ./publish.sh [REDIS_URL] [NAMESPACE]     # defaults: redis://127.0.0.1:6379/0 and sf
#
# Needs redis-cli 6 or newer (for -u and --no-auth-warning). Serve the roles with:
#   streamflow worker --app examples.outside_python.app:app
set -eu

url=${1:-redis://127.0.0.1:6379/0}
ns=${2:-sf}

rcli() { redis-cli -u "$url" --no-auth-warning --raw "$@"; }

# A message id: 32 lowercase hex digits, like the ones streamflow makes.
new_id() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }

# Milliseconds since the epoch, by the Redis server's clock (`date +%s%3N` is not portable).
now_ms() { rcli TIME | { read -r s && read -r us && echo $((s * 1000 + us / 1000)); }; }

# Poll a condition every 0.05 s for up to 30 s; fail with a message when it never holds.
wait_for() {
    what=$1
    shift
    tries=600
    until "$@"; do
        tries=$((tries - 1))
        if [ "$tries" -le 0 ]; then
            echo "gave up waiting for $what (is a worker running?)" >&2
            exit 1
        fi
        sleep 0.05
    done
}

# 1. A job is one XADD of one field, `message`, holding the JSON envelope. Quote the key: it
#    has braces in it. XADD is not idempotent: do not retry it blindly after a lost reply.
#    `headers` (optional) is metadata the handler reads as ctx.headers: a trace context, a
#    correlation id; string names and values only.
greet_id=$(new_id)
headers='{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01","correlation-id":"shell-1"}'
entry=$(rcli XADD "$ns:{role:greet}:stream" '*' message \
    "{\"protocol\":1,\"kind\":\"job\",\"id\":\"$greet_id\",\"role\":\"greet\",\"payload\":{\"name\":\"shell\"},\"attempt\":1,\"created_at_ms\":$(now_ms),\"headers\":$headers}")
echo "published greet $greet_id (entry $entry)"

# 2. A long job, to cancel while it runs.
slow_id=$(new_id)
slow_entry=$(rcli XADD "$ns:{role:slow}:stream" '*' message \
    "{\"protocol\":1,\"kind\":\"job\",\"id\":\"$slow_id\",\"role\":\"slow\",\"payload\":{\"steps\":600,\"step_seconds\":0.1},\"attempt\":1,\"created_at_ms\":$(now_ms)}")
echo "published slow $slow_id (entry $slow_entry)"

# A worker has taken it once the entry is pending in the role's consumer group, `workers`.
taken() { [ "$(rcli XPENDING "$ns:{role:slow}:stream" workers "$slow_entry" "$slow_entry" 1 | head -n 1)" = "$slow_entry" ]; }
wait_for "a worker to take $slow_id" taken

# 3. Cancel it by message id: the persistent marker and its index entry first (workers started
#    later honour it), then the signal that running workers act on at once. The marker's key names the same
#    target and target_id as the JSON it holds.
sig_id=$(new_id)
sig="{\"protocol\":1,\"kind\":\"cancel\",\"id\":\"$sig_id\",\"target\":\"message\",\"target_id\":\"$slow_id\",\"reason\":\"cancelled from the shell\",\"requested_by\":\"publish.sh\",\"created_at_ms\":$(now_ms)}"
rcli SET "$ns:{signals}:cancel:message:$slow_id" "$sig" PX 604800000 >/dev/null
# Its entry in the cancel index, scored with the marker's expiry by the server's clock: workers
# started later find the markers through the index, never by scanning the keyspace.
expiry=$(( $(rcli TIME | head -n 1) * 1000 + 604800000 ))
rcli ZADD "$ns:{signals}:cancels" "$expiry" "message:$slow_id" >/dev/null
rcli XADD "$ns:{signals}:stream" MAXLEN '~' 10000 '*' signal "$sig" >/dev/null

# 4. Each worker that stopped (or refused) the job lists it in its report on the signal.
stopped() { rcli HGETALL "$ns:{signals}:report:$sig_id" | grep -q "\"stopped\":\[[^]]*\"$slow_id\""; }
wait_for "a worker to report $slow_id stopped" stopped
echo "cancelled slow $slow_id"
rcli HGETALL "$ns:{signals}:report:$sig_id"
