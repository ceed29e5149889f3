#!lua
-- Commit one step of a task's state machine, if nobody committed since it was loaded.
-- State, outputs, partial results and the dispatches they justify (the outbox) change in one
-- step: a coordinator that dies after it leaves an outbox any other coordinator can finish.
-- KEYS[1] state hash, KEYS[2] outbox hash, KEYS[3..n] output lists and partials hashes
-- ARGV[1] expected version, ARGV[2] retention ms (0: keep), then sections, each a count
-- followed by its items:
--   state fields (field, value), outbox items (field, value),
--   appends (key index, value), partials (key index, field, value)
-- Returns the new version, or false when the version moved (load again and retry). An
-- expected version that is not a number matches a stored one that is not a number either.
local state = KEYS[1]
local version = tonumber(redis.call('HGET', state, 'v') or '-1')
if version ~= tonumber(ARGV[1]) then
  return false
end
local i = 3
local n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  redis.call('HSET', state, ARGV[i], ARGV[i + 1]); i = i + 2
end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]); i = i + 2
end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  redis.call('RPUSH', KEYS[tonumber(ARGV[i])], ARGV[i + 1]); i = i + 2
end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  redis.call('HSET', KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2]); i = i + 3
end
-- A version that is not a number (hand-written) is only ever replaced by a failed state.
version = version or 0
redis.call('HSET', state, 'v', version + 1)
local retention = tonumber(ARGV[2])
if retention > 0 then
  for k = 1, #KEYS do
    redis.call('PEXPIRE', KEYS[k], retention)
  end
end
return version + 1
