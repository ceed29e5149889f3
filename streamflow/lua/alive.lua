#!lua
-- Hold or give up the liveness key of a consumer name. Two live processes sharing a consumer
-- name would share a pending list (and one could ack the other's work), so a worker refuses to
-- start on a name whose key another process holds.
-- KEYS[1] liveness key
-- ARGV[1] 'acquire' | 'refresh' | 'release', ARGV[2] this process's token, ARGV[3] ttl ms
-- Returns 1 on success; for acquire, 0 when another process holds it; for refresh, 0 when lost.
-- pcall: another type of key at the name (anyone with write access may make one) counts as
-- held by someone else: never overwritten, and never an error that stops a worker.
local holder = redis.pcall('GET', KEYS[1])
if type(holder) == 'table' and holder.err then
  return 0
end
if ARGV[1] == 'release' then
  if holder == ARGV[2] then
    redis.call('DEL', KEYS[1])
  end
  return 1
end
if holder and holder ~= ARGV[2] then
  return 0
end
-- Free, or ours (a refresh after the key expired while we were frozen takes it again).
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
