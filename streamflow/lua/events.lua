#!lua
-- Write a buffer of lifecycle events: each entry XADDed to the capped stream, in order, and the
-- latest progress of the runs that report it set (or deleted: their run ended).
-- One call instead of a pipeline of XADDs: redis-py packs and parses each pipelined command in
-- Python (about 30 us each on a small machine), the script takes them as one command.
-- KEYS[1] lifecycle stream, KEYS[2..] progress keys (in the stream's slot, see keys.py)
-- ARGV[1] the stream's cap (MAXLEN ~), ARGV[2] the entries' field, ARGV[3] progress TTL (ms),
-- then one value per progress key ('' deletes the key), then the entries (JSON arrays)
-- Returns the number of entries added.
local stream, cap, field, ttl = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local keys = #KEYS
for i = 2, keys do
  local raw = ARGV[i + 2]
  if raw == '' then
    redis.call('DEL', KEYS[i])
  else
    redis.call('SET', KEYS[i], raw, 'PX', ttl)
  end
end
for i = keys + 3, #ARGV do
  redis.call('XADD', stream, 'MAXLEN', '~', cap, '*', field, ARGV[i])
end
return #ARGV - keys - 2
