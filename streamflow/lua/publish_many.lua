#!lua
-- Publish many jobs to one role stream in one call (one round trip, no per-command parsing on
-- the client: several times faster than a pipeline of XADDs from redis-py).
-- KEYS[1] role stream
-- ARGV[1..n] message JSON
-- Returns the new entry ids in order.
local ids = {}
for i = 1, #ARGV do
  ids[i] = redis.call('XADD', KEYS[1], '*', 'message', ARGV[i])
end
return ids
