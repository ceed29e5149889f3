#!lua
-- Park an entry that a per-key limit holds back: move it, in one step, from the role stream
-- (acknowledged and deleted) to its limit key's parked list next to the stream, so that it
-- holds no lease and no worker's buffer while it waits. unpark.lua moves it back.
-- KEYS[1] role stream, KEYS[2] parked keys (zset: limit key -> wake at ms), KEYS[3] the key's
--         parked list, KEYS[4] the entry's start count (poison detection; carried along)
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] entry id, ARGV[4] limit key, ARGV[5] wake at ms
--         (server time; an earlier wake already set for the key is kept), ARGV[6] the priority
--         level of KEYS[1] (0 if absent): unpark.lua puts the job back on that level's stream
-- Returns 1 when parked, 0 when this consumer does not own the entry (or it is gone).
-- An entry parked before (its `parked` field) goes to the front: it keeps its place in its key.
-- Owner check (owned_entry) is fence.lua, which scripts.py prepends.
local stream, group, me, id = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
if not owned_entry(stream, group, me, id) then
  return 0
end
local found = redis.call('XRANGE', stream, id, id)
if #found == 0 then
  return 0
end
local fields, parks = found[1][2], 0
for i = 1, #fields, 2 do
  if fields[i] == 'parked' then parks = tonumber(fields[i + 1]) or 0 end
end
local starts = tonumber(redis.call('GET', KEYS[4]) or '') or 0
-- The item: the start count and the level (<starts>,<level>;), then each field and value as
-- <length>:<bytes> (binary-safe, and needs no library: fakeredis's Lua has neither cmsgpack nor
-- a byte-exact cjson).
local level = math.max(math.floor(tonumber(ARGV[6] or '0') or 0), 0)
local parts = {tostring(starts), ',', tostring(level), ';'}
for i = 1, #fields do
  parts[#parts + 1] = #fields[i] .. ':' .. fields[i]
end
local item = table.concat(parts)
if parks > 0 then
  redis.call('LPUSH', KEYS[3], item)
else
  redis.call('RPUSH', KEYS[3], item)
end
redis.call('ZADD', KEYS[2], 'LT', tonumber(ARGV[5]), ARGV[4])
redis.call('XACK', stream, group, id)
redis.call('XDEL', stream, id)
redis.call('DEL', KEYS[4])
return 1
