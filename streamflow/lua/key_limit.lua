#!lua
-- Per-key limits of a role across every worker: for one limit key (a customer id, say), a cap
-- on its jobs running at once and a start rate (GCRA, no burst). Every key shares {flow:<role>}.
-- KEYS[1] flow control hash (fields key_concurrency, key_rate_count, key_rate_period_ms
--         override the declared ones; 0 means no limit), KEYS[2] the key's running slots
--         (zset: token -> expiry ms), KEYS[3] the key's rate state (next start time, ms),
--         KEYS[4] the role's keys holding slots (zset: limit key -> latest expiry ms),
--         KEYS[5] the role's keys with parked jobs (zset: limit key -> mark count)
-- ARGV[1] acquire | free | parked | renew | release | unmark, ARGV[2] the limit key,
-- ARGV[3] declared key rate count, ARGV[4] declared rate period ms, ARGV[5] declared key
--         concurrency (0: none), ARGV[6] slot ttl ms, ARGV[7..n] tokens
-- acquire (one token): {1, next, tracked} when granted (tracked: the token holds a running slot;
--          next: with a rate, the server time of the key's next start, else 0);
--          {0, wake at ms} when not: the server time at which to ask again (the earliest
--          slot's expiry, or the next start the rate allows).
-- free: 1 if an acquire would be granted now (nothing taken), else 0.
-- parked: a job of the key was just parked: marks the key (its mark count rises), then as free.
-- release: frees the tokens' slots; returns the key's mark count (0: no parked job known, no
--          wake needed). unmark: removes the mark if its count is still ARGV[7] (no job was
--          parked since the releaser found none to wake).
-- renew: extends the tokens' slots (only those still held).
-- Uses the server's clock, so workers with skewed clocks agree.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op, key, ttl = ARGV[1], ARGV[2], tonumber(ARGV[6])

local function setting(field, declared)
  local value = redis.call('HGET', KEYS[1], field)
  return tonumber(value or declared) or 0
end

if op == 'release' then
  for i = 7, #ARGV do redis.call('ZREM', KEYS[2], ARGV[i]) end
  if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('ZREM', KEYS[4], key) end
  return tonumber(redis.call('ZSCORE', KEYS[5], key) or '0')
end
if op == 'unmark' then
  if redis.call('ZSCORE', KEYS[5], key) == ARGV[7] then redis.call('ZREM', KEYS[5], key) end
  return 0
end
if op == 'parked' then
  redis.call('ZINCRBY', KEYS[5], 1, key)
  op = 'free'
end
if op == 'renew' then
  local kept = 0
  for i = 7, #ARGV do kept = kept + redis.call('ZADD', KEYS[2], 'XX', 'CH', now + ttl, ARGV[i]) end
  if kept > 0 then redis.call('ZADD', KEYS[4], 'GT', now + ttl, key) end
  return kept
end

local count, period
if redis.call('HEXISTS', KEYS[1], 'key_rate_count') == 1 then
  count, period = setting('key_rate_count', 0), setting('key_rate_period_ms', 0)
else
  count, period = tonumber(ARGV[3]) or 0, tonumber(ARGV[4]) or 0
end
local step = nil
if count > 0 and period > 0 then step = period / count end
local cap = setting('key_concurrency', ARGV[5])
if cap <= 0 then cap = nil end

if cap then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)  -- slots of workers that died
  if redis.call('ZCARD', KEYS[2]) >= cap then
    if op == 'free' then return 0 end
    local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {0, math.max(math.ceil(tonumber(first[2])), now + 1)}
  end
end
local tat = now
if step then
  tat = math.max(tonumber(redis.call('GET', KEYS[3]) or '') or now, now)
  if tat > now then
    if op == 'free' then return 0 end
    return {0, math.ceil(tat)}
  end
end
if op == 'free' then return 1 end
local next = 0
if step then
  redis.call('SET', KEYS[3], string.format('%.3f', tat + step), 'PX', math.ceil(step) + 1000)
  next = math.ceil(tat + step)
end
if cap then
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[7])
  redis.call('ZADD', KEYS[4], 'GT', now + ttl, key)
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - ttl)  -- keys whose holders all died
  return {1, next, 1}
end
return {1, next, 0}
