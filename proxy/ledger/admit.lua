-- Admit a request and place a credit hold for its worst-case cost, atomically.
-- Renews a lapsed cycle of a self-renewing account first (no cron needed for correctness).
--
-- KEYS: 1 account hash, 2 holds zset (score = expiry ms), 3 ledger stream
-- ARGV: 1 now_ms, 2 tier the caller priced the request for, 3 hold ("<id>|<user>|<µ$>", the
--       holds zset member: all the expiry sweep needs), 4 hold amount (µ$),
--       5 policy ("strict" | "lenient"), 6 monthly tokens, 7 monthly requests, 8 rpm
--       (each -1 = unlimited), 9 hold ttl ms, 10 tier allowance (µ$), 11 cycle length ms
--       (0 = calendar months: 13 and 14 are the current month's start and end ms),
--       12 user id
-- Returns {"ok", balance, held, tokens, requests} or {reason, ...}: "no_account", "tier" + actual tier,
-- "suspended", "tokens" / "requests" + cycle end ms, "rpm" + retry-after ms,
-- "credits" + balance + held + cycle end ms.
local a = redis.call('HMGET', KEYS[1], 'tier', 'status', 'balance', 'held', 'open_holds',
  'cycle_end', 'auto_renew', 'tokens', 'requests', 'rpm_win', 'rpm_cur', 'rpm_prev')
if not a[1] then return {'no_account'} end
if a[1] ~= ARGV[2] then return {'tier', a[1]} end
if a[2] == 'suspended' then return {'suspended'} end

local now = tonumber(ARGV[1])
local balance = tonumber(a[3])
local held = tonumber(a[4])
local open_holds = tonumber(a[5])
local cycle_end = tonumber(a[6])
local tokens = tonumber(a[8])
local requests = tonumber(a[9])

if a[7] == '1' and now >= cycle_end then
  local cycle_ms = tonumber(ARGV[11])
  local start
  if cycle_ms > 0 then
    start = cycle_end + math.floor((now - cycle_end) / cycle_ms) * cycle_ms
    cycle_end = start + cycle_ms
  else
    start, cycle_end = tonumber(ARGV[13]), tonumber(ARGV[14])
  end
  local allowance = tonumber(ARGV[10])
  local delta = allowance - balance
  balance, tokens, requests = allowance, 0, 0
  redis.call('HDEL', KEYS[1], 'warned_credits', 'warned_tokens', 'warned_requests')
  redis.call('HSET', KEYS[1], 'balance', ARGV[10], 'tokens', 0, 'requests', 0, 'cost', 0,
    'cycle_start', string.format('%.0f', start), 'cycle_end', string.format('%.0f', cycle_end))
  redis.call('XADD', KEYS[3], '*', 'kind', 'reset', 'id', 'reset_' .. ARGV[12] .. '_' .. string.format('%.0f', start), 'user', ARGV[12],
    'amount', string.format('%.0f', delta), 'balance', ARGV[10], 'ts', ARGV[1], 'tier', ARGV[2])
end

local max_tokens, max_requests, rpm = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local ends = string.format('%.0f', cycle_end)
if max_tokens >= 0 and tokens >= max_tokens then return {'tokens', ends} end
if max_requests >= 0 and requests + open_holds >= max_requests then return {'requests', ends} end

-- Sliding-window rate: the previous minute's count, weighted by how much of it still
-- overlaps the last 60 s, plus this minute's count.
local win = math.floor(now / 60000)
local cur, prev = 0, 0
if tonumber(a[10]) == win then
  cur, prev = tonumber(a[11]), tonumber(a[12])
elseif tonumber(a[10]) == win - 1 then
  prev = tonumber(a[11])
end
if rpm >= 0 and prev * (1 - (now % 60000) / 60000) + cur >= rpm then
  return {'rpm', 60000 - now % 60000}
end

local amount = tonumber(ARGV[4])
local available = balance - held
if (ARGV[5] == 'strict' and available < amount) or (ARGV[5] ~= 'strict' and available <= 0) then
  return {'credits', string.format('%.0f', balance), string.format('%.0f', held), ends}
end

redis.call('ZADD', KEYS[2], string.format('%.0f', now + tonumber(ARGV[9])), ARGV[3])
held = held + amount
redis.call('HSET', KEYS[1], 'rpm_win', win, 'rpm_cur', cur + 1, 'rpm_prev', prev,
  'open_holds', open_holds + 1, 'held', string.format('%.0f', held))
return {'ok', string.format('%.0f', balance), string.format('%.0f', held), string.format('%.0f', tokens), string.format('%.0f', requests)}
