#!lua
-- Take one of a role's node slots for a task node (the per-role limit on running nodes).
-- KEYS[1] role slots set; ARGV[1] member (task/node), ARGV[2] limit
-- Returns 1 when the member holds a slot (now or already), 0 when the role is at its limit.
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then
  return 1
end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
