-- Admit a request and place a credit hold for its worst-case cost, atomically, with the
-- hold's first progress record (what it costs if its proxy dies before a heartbeat: the
-- prompt estimate). Renews a lapsed cycle of a self-renewing account first (no cron).
--
-- KEYS: 1 account hash, 2 holds zset (score = expiry ms), 3 ledger stream,
--       4 progress hash (hold id -> "<cost µ$> <tokens> <usage JSON>")
-- ARGV: 1 now_ms, 2 tier the caller priced the request for, 3 hold ("<id>|<user>|<µ$>", the
--       holds zset member), 4 hold amount (µ$), 5 policy ("strict" | "lenient"),
--       6 monthly tokens, 7 monthly requests, 8 rpm (each -1 = unlimited), 9 hold ttl ms,
--       10 tier allowance (µ$), 11 cycle length ms (0 = calendar months: 13 and 14 are the
--       current month's start and end ms), 12 user id, 15 hold id, 16 first progress record
--       ("" for none: an expiry then voids the hold)
-- Returns {"ok", balance, held, tokens, requests} or {reason, ...}: "no_account", "tier" + actual tier,
-- "suspended", "tokens" / "requests" + cycle end ms, "rpm" + retry-after ms,
-- "credits" + balance + held + cycle end ms. An amount out of range is an error reply.
local LIMIT = 1125899906842624  -- 2^50: every amount and count stays exact in Lua's doubles
local TOTAL = 4503599627370496  -- 2^52: no running total may grow beyond this
local function bounded(s)
  local n = string.match(s, '^-?%d+$') and tonumber(s)
  if not n or n < -LIMIT or n > LIMIT then
    return redis.error_reply('ERR costproxy: not an integer within 2^50: ' .. tostring(s))
  end
  return n
end
local numbers = {}
for _, i in ipairs({1, 4, 6, 7, 8, 9, 10, 11, 13, 14}) do
  local n = bounded(ARGV[i])
  if type(n) == 'table' then return n end
  numbers[i] = n
end
if numbers[4] < 0 then return redis.error_reply('ERR costproxy: negative hold') end
local pc, pt = string.match(ARGV[16], '^(%d+) (%d+) .+$')
if ARGV[16] ~= '' and (not pc or tonumber(pc) > LIMIT or tonumber(pt) > LIMIT) then
  return redis.error_reply('ERR costproxy: a progress record is "<cost> <tokens> <json>" within 2^50')
end

local a = redis.call('HMGET', KEYS[1], 'tier', 'status', 'balance', 'held', 'open_holds',
  'cycle_end', 'auto_renew', 'tokens', 'requests', 'rpm_win', 'rpm_cur', 'rpm_prev')
if not a[1] then return {'no_account'} end
if a[1] ~= ARGV[2] then return {'tier', a[1]} end
if a[2] == 'suspended' then return {'suspended'} end

local now = numbers[1]
local balance = tonumber(a[3])
if redis.call('ZSCORE', KEYS[2], ARGV[3]) then  -- placed already: a retry whose reply was lost
  return {'ok', a[3], a[4], a[8], a[9]}
end
local held = tonumber(a[4])
local open_holds = tonumber(a[5])
local cycle_end = tonumber(a[6])
local tokens = tonumber(a[8])
local requests = tonumber(a[9])
local function int(n) return string.format('%.0f', n) end

if a[7] == '1' and now >= cycle_end then
  local cycle_ms = numbers[11]
  local start
  if cycle_ms > 0 then
    start = cycle_end + math.floor((now - cycle_end) / cycle_ms) * cycle_ms
    cycle_end = start + cycle_ms
  else
    start, cycle_end = numbers[13], numbers[14]
  end
  local allowance = numbers[10]
  local delta = allowance - balance
  balance, tokens, requests = allowance, 0, 0
  redis.call('HDEL', KEYS[1], 'warned_credits', 'warned_tokens', 'warned_requests')
  redis.call('HSET', KEYS[1], 'balance', int(allowance), 'tokens', 0, 'requests', 0, 'cost', 0,
    'cycle_start', int(start), 'cycle_end', int(cycle_end))
  redis.call('XADD', KEYS[3], '*', 'kind', 'reset', 'id', 'reset_' .. ARGV[12] .. '_' .. int(start), 'user', ARGV[12],
    'amount', int(delta), 'balance', int(allowance), 'ts', ARGV[1], 'tier', ARGV[2],
    'cycle_start', int(start), 'cycle_end', int(cycle_end), 'auto_renew', '1')
end

local max_tokens, max_requests, rpm = numbers[6], numbers[7], numbers[8]
local ends = int(cycle_end)
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

local amount = numbers[4]
if held + amount > TOTAL then return redis.error_reply('ERR costproxy: the holds would exceed 2^52') end
local available = balance - held
if (ARGV[5] == 'strict' and available < amount) or (ARGV[5] ~= 'strict' and available <= 0) then
  return {'credits', int(balance), int(held), ends}
end

redis.call('ZADD', KEYS[2], int(now + numbers[9]), ARGV[3])
if ARGV[16] ~= '' then redis.call('HSET', KEYS[4], ARGV[15], ARGV[16]) end
held = held + amount
redis.call('HSET', KEYS[1], 'rpm_win', win, 'rpm_cur', cur + 1, 'rpm_prev', prev,
  'open_holds', open_holds + 1, 'held', int(held))
return {'ok', int(balance), int(held), int(tokens), int(requests)}
