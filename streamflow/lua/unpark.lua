#!lua
-- Wake one parked job of a limit key: move the oldest from the key's parked list back to the
-- role stream (a new entry at its end, its `parked` field counting the parks), in one step.
-- KEYS[1] role stream (level 0), KEYS[2] parked keys (zset: limit key -> wake at ms), KEYS[3]
--         the key's parked list, KEYS[4..] the streams of the role's levels 1, 2, ... (none for
--         a role without priorities): a job goes back to the level it was parked from (clamped
--         to the highest level given)
-- ARGV[1] limit key, ARGV[2] due | now (due: only if the key's wake time has come),
--         ARGV[3] ms from now at which the key's other parked jobs are looked at again
-- Returns {new entry id, start count carried, level} for the job woken, or {} when none was.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key = ARGV[1]
if ARGV[2] == 'due' then
  local wake = tonumber(redis.call('ZSCORE', KEYS[2], key) or '')
  if not wake or wake > now then return {} end
end
local item = redis.call('LPOP', KEYS[3])
if not item then
  redis.call('ZREM', KEYS[2], key)
  return {}
end
-- park.lua's item: <start count>,<level>; then each field and value as <length>:<bytes> (an
-- item parked before levels were recorded has no ,<level>: level 0).
local at = string.find(item, ';', 1, true)
local head = string.sub(item, 1, at - 1)
local comma = string.find(head, ',', 1, true)
local starts, level = tonumber(head) or 0, 0
if comma then
  starts = tonumber(string.sub(head, 1, comma - 1)) or 0
  level = math.floor(tonumber(string.sub(head, comma + 1)) or 0)
end
local target = KEYS[1]
if level > 0 and #KEYS > 3 then target = KEYS[math.min(3 + level, #KEYS)] end
local stored = {}
at = at + 1
while at <= #item do
  local colon = string.find(item, ':', at, true)
  local size = tonumber(string.sub(item, at, colon - 1))
  stored[#stored + 1] = string.sub(item, colon + 1, colon + size)
  at = colon + size + 1
end
local fields, parks = {}, 1
for i = 1, #stored, 2 do
  if stored[i] == 'parked' then
    parks = (tonumber(stored[i + 1]) or 0) + 1
  else
    fields[#fields + 1] = stored[i]
    fields[#fields + 1] = stored[i + 1]
  end
end
fields[#fields + 1] = 'parked'
fields[#fields + 1] = tostring(parks)
local id = redis.call('XADD', target, '*', unpack(fields))
if redis.call('LLEN', KEYS[3]) == 0 then
  redis.call('ZREM', KEYS[2], key)
elseif ARGV[2] == 'due' then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), key)
else  -- woken by a freed slot: an earlier wake already set (by the rate) stands
  redis.call('ZADD', KEYS[2], 'LT', now + tonumber(ARGV[3]), key)
end
return {id, starts, level}
