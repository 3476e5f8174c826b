-- Resolve a credit hold exactly once: post the actual cost, or void it.
-- Posting also adds to the cycle's counters; both append a ledger event to the stream.
--
-- A hold is pending while its member is in the holds zset: removing it is the one step
-- that releases it, so two resolutions can never both release. A void leaves a marker
-- ("voided", for MARKER ms) because the request of an expired hold may still finish: its
-- post then charges, since the provider bills the request, releases nothing, and turns the
-- marker into "posted". Any other resolution of a hold no longer pending is a duplicate
-- (a retry whose first attempt went through).
--
-- KEYS: 1 account hash, 2 holds zset, 3 void marker, 4 ledger stream
-- ARGV: 1 "post" | "void", 2 cost (µ$), 3 tokens, 4 ledger event id, 5 now_ms, 6 user id,
--       7 hold id, 8 void marker ttl ms, 9 allowance (µ$), 10 monthly tokens, 11 monthly
--       requests (-1 = unlimited), 12 warning threshold in per mille,
--       13 the event's details as one JSON object (stored as field "e" of the entry),
--       14 the hold's zset member, 15 the hold's amount (µ$)
-- A post that first takes credits, tokens or requests of this cycle over the threshold
-- also appends one "warning" event per crossing (flags reset with the cycle).
-- Returns {"ok", balance, held, tokens, requests}, {"dup"} when already resolved this way,
-- or {"no_account"} (the hold is dropped: there is nothing left to release it from).
local mode = ARGV[1]
-- One read and one write of the account: fewer commands than an HINCRBY per counter.
local a = redis.call('HMGET', KEYS[1], 'balance', 'held', 'open_holds', 'tokens', 'requests', 'cost', 'cycle_start')
if not a[1] then
  redis.call('ZREM', KEYS[2], ARGV[14])
  return {'no_account'}
end
local pending = redis.call('ZREM', KEYS[2], ARGV[14]) == 1
if not pending then
  if mode == 'void' or redis.call('GET', KEYS[3]) ~= 'voided' then return {'dup'} end
  redis.call('SET', KEYS[3], 'posted', 'KEEPTTL')
elseif mode == 'void' then
  redis.call('SET', KEYS[3], 'voided', 'PX', ARGV[8])
end

local balance, held, open_holds = tonumber(a[1]), tonumber(a[2]), tonumber(a[3])
local tokens, requests, cost = tonumber(a[4]), tonumber(a[5]), tonumber(a[6])
if pending then
  held, open_holds = held - tonumber(ARGV[15]), open_holds - 1
end
local amount = 0
if mode == 'post' then
  amount = 0 - tonumber(ARGV[2])  -- not -x: a free request must log 0, not "-0"
  balance, tokens, requests, cost = balance + amount, tokens + tonumber(ARGV[3]), requests + 1, cost + tonumber(ARGV[2])
end
local function int(n) return string.format('%.0f', n) end
redis.call('HSET', KEYS[1], 'balance', int(balance), 'held', int(held), 'open_holds', int(open_holds),
  'tokens', int(tokens), 'requests', int(requests), 'cost', int(cost))

redis.call('XADD', KEYS[4], '*', 'kind', mode == 'post' and 'charge' or 'void', 'id', ARGV[4], 'user', ARGV[6],
  'amount', int(amount), 'balance', int(balance), 'ts', ARGV[5], 'hold', ARGV[7], 'e', ARGV[13])

if mode == 'post' then
  local threshold = tonumber(ARGV[12])
  local allowance = tonumber(ARGV[9])
  local checks = {
    {'credits', allowance - balance, allowance},
    {'tokens', tokens, tonumber(ARGV[10])},
    {'requests', requests, tonumber(ARGV[11])},
  }
  for _, c in ipairs(checks) do
    local metric, used, limit = c[1], c[2], c[3]
    if limit > 0 and used * 1000 >= limit * threshold
        and redis.call('HSETNX', KEYS[1], 'warned_' .. metric, 1) == 1 then
      redis.call('XADD', KEYS[4], '*', 'kind', 'warning', 'id',
        'warn_' .. ARGV[6] .. '_' .. metric .. '_' .. a[7], 'user', ARGV[6], 'metric', metric,
        'used', int(used), 'limit', int(limit), 'ts', ARGV[5])
    end
  end
end
return {'ok', int(balance), int(held), int(tokens), int(requests)}
