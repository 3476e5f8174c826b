-- Resolve a credit hold exactly once: post the actual cost, or void it.
-- Posting also adds to the cycle's counters; both append a ledger event to the stream.
-- A post for a hold already voided (it expired first) still charges, since the
-- provider bills the request, but releases nothing twice.
--
-- KEYS: 1 account hash, 2 holds zset, 3 hold hash, 4 ledger stream
-- ARGV: 1 "post" | "void", 2 cost (µ$), 3 tokens, 4 ledger event id, 5 now_ms, 6 user id,
--       7 hold id, 8 marker ttl ms, 9.. further event fields as name, value pairs
-- Returns {"ok", balance, held} or {"dup"} when the hold was already resolved this way.
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

local a = redis.call('HMGET', KEYS[1], 'balance', 'held')
local event = {'kind', mode == 'post' and 'charge' or 'void', 'id', ARGV[4], 'user', ARGV[6],
  'amount', string.format('%.0f', amount), 'balance', a[1], 'ts', ARGV[5], 'hold', ARGV[7]}
for i = 9, #ARGV do event[#event + 1] = ARGV[i] end
redis.call('XADD', KEYS[4], '*', unpack(event))
return {'ok', a[1], a[2]}
