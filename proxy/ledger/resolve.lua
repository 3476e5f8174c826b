-- Resolve a credit hold exactly once: post the actual cost, or void it.
-- Posting also adds to the cycle's counters; both append a ledger event to the stream.
-- A post for a hold already voided (it expired first) still charges, since the
-- provider bills the request, but releases nothing twice.
--
-- KEYS: 1 account hash, 2 holds zset, 3 hold hash, 4 ledger stream
-- ARGV: 1 "post" | "void", 2 cost (µ$), 3 tokens, 4 ledger event id, 5 now_ms, 6 user id,
--       7 hold id, 8 marker ttl ms, 9 allowance (µ$), 10 monthly tokens, 11 monthly
--       requests (-1 = unlimited), 12 warning threshold in per mille,
--       13.. further event fields as name, value pairs
-- A post that first takes credits, tokens or requests of this cycle over the threshold
-- also appends one "warning" event per crossing (flags reset with the cycle).
-- Returns {"ok", balance, held, tokens, requests} or {"dup"} when already resolved this way.
local mode = ARGV[1]
local h = redis.call('HMGET', KEYS[3], 'state', 'amount')
local state = h[1]
if state == 'posted' or (mode == 'void' and state ~= 'pending') then return {'dup'} end

if state == 'pending' then
  redis.call('HINCRBY', KEYS[1], 'held', -tonumber(h[2]))
  redis.call('HINCRBY', KEYS[1], 'open_holds', -1)
  redis.call('ZREM', KEYS[2], ARGV[7])
end

local amount = 0
if mode == 'post' then
  amount = -tonumber(ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'balance', amount)
  redis.call('HINCRBY', KEYS[1], 'tokens', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'requests', 1)
  redis.call('HINCRBY', KEYS[1], 'cost', ARGV[2])
end
redis.call('HSET', KEYS[3], 'state', mode == 'post' and 'posted' or 'voided')
redis.call('PEXPIRE', KEYS[3], ARGV[8])

local a = redis.call('HMGET', KEYS[1], 'balance', 'held', 'tokens', 'requests', 'cycle_start')
local event = {'kind', mode == 'post' and 'charge' or 'void', 'id', ARGV[4], 'user', ARGV[6],
  'amount', string.format('%.0f', amount), 'balance', a[1], 'ts', ARGV[5], 'hold', ARGV[7]}
for i = 13, #ARGV do event[#event + 1] = ARGV[i] end
redis.call('XADD', KEYS[4], '*', unpack(event))

if mode == 'post' then
  local threshold = tonumber(ARGV[12])
  local allowance = tonumber(ARGV[9])
  local checks = {
    {'credits', allowance - tonumber(a[1]), allowance},
    {'tokens', tonumber(a[3]), tonumber(ARGV[10])},
    {'requests', tonumber(a[4]), tonumber(ARGV[11])},
  }
  for _, c in ipairs(checks) do
    local metric, used, limit = c[1], c[2], c[3]
    if limit > 0 and used * 1000 >= limit * threshold
        and redis.call('HSETNX', KEYS[1], 'warned_' .. metric, 1) == 1 then
      redis.call('XADD', KEYS[4], '*', 'kind', 'warning', 'id',
        'warn_' .. ARGV[6] .. '_' .. metric .. '_' .. a[5], 'user', ARGV[6], 'metric', metric,
        'used', string.format('%.0f', used), 'limit', string.format('%.0f', limit), 'ts', ARGV[5])
    end
  end
end
return {'ok', a[1], a[2], a[3], a[4]}
