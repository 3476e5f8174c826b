-- Move credits outside a request, exactly once per event id: open an account with its
-- first allowance, add a grant or refund, or set the balance (a new cycle).
--
-- KEYS: 1 account hash, 2 ledger stream, 3 marker of this event id (kept for ARGV[8] ms)
-- ARGV: 1 "open" | "add" | "set", 2 amount (µ$; for "set" the new balance), 3 event id,
--       4 now_ms, 5 user id, 6 ledger kind (grant, refund, reset, ...), 7 reason,
--       8 marker ttl ms, and for "open": 9 tier, 10 cycle start ms, 11 cycle end ms,
--       12 auto renew ("1" | "0")
-- Returns {"ok", balance} or {"dup"} (event already applied) or {"exists"} / {"no_account"}.
if redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[8]) == false then return {'dup'} end

local mode = ARGV[1]
local exists = redis.call('EXISTS', KEYS[1]) == 1
if mode == 'open' and exists then return {'exists'} end
if mode ~= 'open' and not exists then
  redis.call('DEL', KEYS[3])
  return {'no_account'}
end

local delta
if mode == 'open' then
  redis.call('HSET', KEYS[1], 'tier', ARGV[9], 'status', 'active', 'balance', ARGV[2], 'held', 0,
    'open_holds', 0, 'cycle_start', ARGV[10], 'cycle_end', ARGV[11], 'auto_renew', ARGV[12],
    'tokens', 0, 'requests', 0, 'cost', 0, 'rpm_win', 0, 'rpm_cur', 0, 'rpm_prev', 0)
  delta = ARGV[2]
elseif mode == 'set' then
  delta = string.format('%.0f', tonumber(ARGV[2]) - tonumber(redis.call('HGET', KEYS[1], 'balance')))
  redis.call('HSET', KEYS[1], 'balance', ARGV[2])
else
  redis.call('HINCRBY', KEYS[1], 'balance', ARGV[2])
  delta = ARGV[2]
end
local balance = redis.call('HGET', KEYS[1], 'balance')
redis.call('XADD', KEYS[2], '*', 'kind', ARGV[6], 'id', ARGV[3], 'user', ARGV[5], 'amount', delta,
  'balance', balance, 'ts', ARGV[4], 'reason', ARGV[7])
return {'ok', balance}
