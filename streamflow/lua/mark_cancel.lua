#!lua
-- Make a cancel signal that arrived without a marker persistent (a plain XADD to the signals
-- stream): set its marker unless one is there, and index the marker for its remaining lifetime.
-- KEYS[1] cancel marker, KEYS[2] cancel index
-- ARGV[1] signal JSON, ARGV[2] marker TTL ms, ARGV[3] index member ('<target>:<target id>')
-- Returns 1 if this call set the marker, 0 if one was there already.
local set = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  -- pcall: see cancel.lua.
  redis.pcall('ZADD', KEYS[2], now + ttl, ARGV[3])
end
if set then
  return 1
end
return 0
