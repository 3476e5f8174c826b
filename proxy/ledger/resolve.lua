-- Resolve a credit hold exactly once: post the actual cost, void it, or - for a hold
-- whose proxy stopped renewing it - post its last recorded progress, marked estimated.
-- Posting also adds to the cycle's counters; every resolution appends a ledger event.
--
-- A hold is pending while its member is in the holds zset: removing it is the one step
-- that releases it, so two resolutions can never both release. A resolution of a hold
-- no longer pending is a duplicate (a retry whose first attempt went through, a request
-- finishing after its hold expired and was posted), except for a post of a hold whose
-- admission this Redis lost, which is charged once, releasing nothing:
-- - placed before the account was rebuilt from Postgres (`ledger rebuild`, which stamps
--   `rebuilt`): lost with Redis's data (KEYS[5] remembers the charge for a day);
-- - placed in the last LOST_WINDOW_MS by Redis's clock and not among the holds of the shard
--   resolved in the last RESOLVED_MS (KEYS[6]): never admitted here, so lost in a failover
--   with the old primary's last writes. Every resolution of a hold happens after its
--   placement, so one placed that recently and resolved here is still listed: never
--   charged twice (the margin between the two spans absorbs the proxies' clock skew).
--
-- KEYS: 1 account hash, 2 holds zset, 3 progress hash, 4 ledger stream, 5 marker of a lost
--       hold charged, 6 the shard's recently resolved holds (zset: hold id -> Redis ms)
-- ARGV: 1 "post" | "void" | "expire", 2 cost (µ$), 3 tokens, 4 now_ms, 5 user id,
--       6 hold id, 7 when the hold was placed (ms), 8 allowance (µ$), 9 monthly tokens,
--       10 monthly requests (-1 = unlimited), 11 warning threshold in per mille,
--       12 the event's details as one JSON object (stored as field "e" of the entry),
--       13 the hold's zset member, 14 the hold's amount (µ$)
-- "expire" takes cost, tokens and details from the hold's progress record instead, and
-- does nothing to a hold whose expiry (zset score) is still ahead: {"alive"}.
-- A post that first takes credits, tokens or requests of this cycle over the threshold
-- also appends one "warning" event per crossing (flags reset with the cycle).
-- Returns {"ok", balance, held, tokens, requests, "post" | "void"}, {"dup"}, {"alive"},
-- or {"no_account"} (the hold is dropped: there is nothing left to release it from).
local RESOLVED_MS, LOST_WINDOW_MS = 120000, 60000
local LIMIT = 1125899906842624  -- 2^50: every amount and count stays exact in Lua's doubles
local TOTAL = 4503599627370496  -- 2^52: no running total may grow beyond this
local numbers = {}
for _, i in ipairs({2, 3, 4, 7, 8, 9, 10, 11, 14}) do
  local n = string.match(ARGV[i], '^-?%d+$') and tonumber(ARGV[i])
  if not n or n < -LIMIT or n > LIMIT then
    return redis.error_reply('ERR costproxy: not an integer within 2^50: ' .. tostring(ARGV[i]))
  end
  numbers[i] = n
end
if numbers[2] < 0 or numbers[3] < 0 then return redis.error_reply('ERR costproxy: negative charge') end

local mode, now, member, hold_id = ARGV[1], numbers[4], ARGV[13], ARGV[6]
local cost, tokens, details = numbers[2], numbers[3], ARGV[12]
-- One read and one write of the account: fewer commands than an HINCRBY per counter.
local a = redis.call('HMGET', KEYS[1], 'balance', 'held', 'open_holds', 'tokens', 'requests', 'cost',
  'cycle_start', 'rebuilt')
if not a[1] then
  redis.call('ZREM', KEYS[2], member)
  redis.call('HDEL', KEYS[3], hold_id)
  return {'no_account'}
end

if mode == 'expire' then
  local expiry = redis.call('ZSCORE', KEYS[2], member)
  if not expiry then return {'dup'} end
  if tonumber(expiry) > now then return {'alive'} end
  local record = redis.call('HGET', KEYS[3], hold_id)
  local c, t, j = string.match(record or '', '^(%d+) (%d+) (.+)$')
  if c and (tonumber(c) > LIMIT or tonumber(t) > LIMIT) then c = nil end  -- not a record admit or heartbeat wrote
  if c then
    mode, cost, tokens, details = 'post', tonumber(c), tonumber(t), j
  else
    mode, details = 'void', '{"reason":"expired_without_progress"}'
  end
end

-- Everything is decided and checked before the first write: a refusal leaves no trace.
local clock = redis.call('TIME')
local server_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local placed = numbers[7]
local before_rebuild = a[8] and placed < tonumber(a[8])
local pending = redis.call('ZSCORE', KEYS[2], member) and true or false
if not pending then
  local lost = mode == 'post' and not redis.call('ZSCORE', KEYS[6], hold_id)
    and ((before_rebuild and redis.call('EXISTS', KEYS[5]) == 0) or server_ms - placed < LOST_WINDOW_MS)
  if not lost then
    redis.call('HDEL', KEYS[3], hold_id)
    return {'dup'}
  end
end

local balance, held, open_holds = tonumber(a[1]), tonumber(a[2]), tonumber(a[3])
local counted, requests, spent = tonumber(a[4]), tonumber(a[5]), tonumber(a[6])
if pending then
  held, open_holds = held - numbers[14], open_holds - 1
end
local amount = 0
if mode == 'post' then
  amount = 0 - cost  -- not -x: a free request must log 0, not "-0"
  balance, counted, requests, spent = balance + amount, counted + tokens, requests + 1, spent + cost
end
if balance < -TOTAL or counted > TOTAL or spent > TOTAL then
  return redis.error_reply('ERR costproxy: a running total would exceed 2^52')
end
if pending then
  redis.call('ZREM', KEYS[2], member)
end
if before_rebuild then  -- a repeat would look lost: 1 day, LOST_HOLD_TTL_MS
  redis.call('SET', KEYS[5], '1', 'PX', 86400000)
end
redis.call('ZADD', KEYS[6], server_ms, hold_id)
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', server_ms - RESOLVED_MS)
redis.call('HDEL', KEYS[3], hold_id)
local function int(n) return string.format('%.0f', n) end
redis.call('HSET', KEYS[1], 'balance', int(balance), 'held', int(held), 'open_holds', int(open_holds),
  'tokens', int(counted), 'requests', int(requests), 'cost', int(spent))

redis.call('XADD', KEYS[4], '*', 'kind', mode == 'post' and 'charge' or 'void',
  'id', (mode == 'post' and 'chg_' or 'void_') .. hold_id, 'user', ARGV[5],
  'amount', int(amount), 'balance', int(balance), 'ts', ARGV[4], 'hold', hold_id, 'e', details)

if mode == 'post' then
  local threshold = numbers[11]
  local allowance = numbers[8]
  local checks = {
    {'credits', allowance - balance, allowance},
    {'tokens', counted, numbers[9]},
    {'requests', requests, numbers[10]},
  }
  for _, c in ipairs(checks) do
    local metric, used, limit = c[1], c[2], c[3]
    if limit > 0 and used * 1000 >= limit * threshold
        and redis.call('HSETNX', KEYS[1], 'warned_' .. metric, 1) == 1 then
      redis.call('XADD', KEYS[4], '*', 'kind', 'warning', 'id',
        'warn_' .. ARGV[5] .. '_' .. metric .. '_' .. a[7], 'user', ARGV[5], 'metric', metric,
        'used', int(used), 'limit', int(limit), 'ts', ARGV[4])
    end
  end
end
return {'ok', int(balance), int(held), int(counted), int(requests), mode}
