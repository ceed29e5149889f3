#!lua
-- A role's flow limits across every worker: a start rate (GCRA, one start per emission
-- interval, no burst) and a cap on jobs running at once. Every key shares {flow:<role>}.
-- KEYS[1] flow control hash (fields rate_count, rate_period_ms, concurrency override the
--         declared ones; 0 means no limit), KEYS[2] rate state (the theoretical arrival time,
--         ms), KEYS[3] running slots (zset: token -> expiry ms)
-- ARGV[1] acquire | renew | release | refund
-- ARGV[2] declared rate count, ARGV[3] declared rate period ms, ARGV[4] declared concurrency
--         (0: none), ARGV[5] slot ttl ms, ARGV[6] starts to refund, ARGV[7..n] tokens
-- acquire: returns {granted, wait ms, slots}: the first `granted` tokens hold a start (and,
--          if slots is 1, a running slot); with none granted, wait ms before asking again
--          (-1: until a running slot frees).
-- renew: extends the tokens' slots; release: frees them; refund: gives back starts not used.
-- Uses the server's clock, so workers with skewed clocks agree.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op = ARGV[1]
local ttl = tonumber(ARGV[5])

local function setting(field, declared)
  local value = redis.call('HGET', KEYS[1], field)
  return tonumber(value or declared) or 0
end

local function interval()
  local count, period
  if redis.call('HEXISTS', KEYS[1], 'rate_count') == 1 then
    count, period = setting('rate_count', 0), setting('rate_period_ms', 0)
  else
    count, period = tonumber(ARGV[2]) or 0, tonumber(ARGV[3]) or 0
  end
  if count <= 0 or period <= 0 then return nil end
  return period / count
end

local function cap()
  local value = setting('concurrency', ARGV[4])
  if value <= 0 then return nil end
  return value
end

local function set_tat(tat, step)
  redis.call('SET', KEYS[2], string.format('%.3f', tat), 'PX', math.ceil(step) + 1000)
end

if op == 'release' then
  for i = 7, #ARGV do redis.call('ZREM', KEYS[3], ARGV[i]) end
  return {0, 0}
end
if op == 'renew' then
  for i = 7, #ARGV do redis.call('ZADD', KEYS[3], now + ttl, ARGV[i]) end
  return {0, 0}
end
local step = interval()
if op == 'refund' then
  local tat = tonumber(redis.call('GET', KEYS[2]) or '')
  if step and tat then set_tat(math.max(now, tat - step * tonumber(ARGV[6])), step) end
  return {0, 0}
end

local grant, wait = #ARGV - 6, 0
local slots = cap()
if slots then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)  -- slots of workers that died
  local free = slots - redis.call('ZCARD', KEYS[3])
  if free < grant then grant, wait = math.max(free, 0), -1 end
end
local tat = now
if step then
  tat = math.max(tonumber(redis.call('GET', KEYS[2]) or '') or now, now)
  if tat > now then
    grant, wait = 0, math.ceil(tat - now)
  elseif grant > 1 then
    grant = 1
  end
end
if grant > 0 then
  if step then set_tat(tat + step, step) end
  if slots then
    for i = 1, grant do redis.call('ZADD', KEYS[3], now + ttl, ARGV[6 + i]) end
  end
end
return {grant, wait, slots and 1 or 0}
