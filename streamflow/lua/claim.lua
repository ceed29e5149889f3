#!lua flags=allow-oom
-- Adopt entries idle past the lease TTL (a crashed or frozen worker's work), one bounded step.
-- Without JUSTID, so the adoption counts as a delivery: a message that kills every worker that
-- runs it reaches max_deliveries instead of being adopted forever.
-- KEYS[1] role stream
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] min idle ms, ARGV[4] cursor, ARGV[5] count
-- Returns {next cursor, {{id, {field, value, ...}, delivery count}, ...}, {deleted ids}}.
-- Deleted ids were pending but their entries were removed from the stream (lost work).
local stream, group = KEYS[1], ARGV[1]
local r = redis.call('XAUTOCLAIM', stream, group, ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local adopted = {}
for i, e in ipairs(r[2]) do
  local p = redis.call('XPENDING', stream, group, e[1], e[1], 1)
  adopted[i] = {e[1], e[2], p[1][4]}
end
return {r[1], adopted, r[3] or {}}
