#!lua flags=allow-oom
-- Read the priority levels of one role partition in the order given, without BLOCK, until the
-- read's budget is filled: one XREADGROUP per level, the next level only for what is left.
-- One round trip whatever the number of levels, and never more entries than the budget.
-- flags=allow-oom: XREADGROUP runs when Redis is full (a full Redis must still be drained).
-- KEYS the level streams, in the order to serve them (one partition's: one slot)
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] count (the budget)
-- Returns {{key index (1-based), {{id, {field, value, ...}}, ...}}, ...}: the levels read from.
local group, consumer, left = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
for i, stream in ipairs(KEYS) do
  if left <= 0 then break end
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', left, 'STREAMS', stream, '>')
  if r and r[1] then
    -- {{stream, entries}}; fakeredis (the test Harness) returns {stream, entries} unwrapped.
    local entries = type(r[1]) == 'table' and r[1][2] or r[2]
    left = left - #entries
    out[#out + 1] = {i, entries}
  end
end
return out
