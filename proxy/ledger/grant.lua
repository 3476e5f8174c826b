-- Move credits outside a request, exactly once per event id (a Stripe invoice id, an
-- operator's grant id): open an account, add a grant or refund, or start a new cycle.
--
-- KEYS: 1 account hash, 2 ledger stream, 3 marker of this event id (kept for ARGV[8] ms)
-- ARGV: 1 mode, 2 amount (µ$), 3 event id, 4 now_ms, 5 user id, 6 ledger kind,
--       7 reason, 8 marker ttl ms, 9 tier ("" = keep the account's),
--       and for "open" / "cycle": 10 cycle start ms, 11 cycle end ms, 12 auto renew
--       ("1" | "0"), 13 rollover ("1" keeps a positive balance on top of the allowance)
-- Modes: "open"  create the account with `amount` as its first allowance;
--        "add"   add `amount` (negative removes) and optionally change the tier;
--        "cycle" start a new cycle: balance = `amount` (+ rollover), counters to zero.
-- Returns {"ok", balance} or {"dup"} (event already applied), {"exists"}, {"no_account"}.
if redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[8]) == false then return {'dup'} end

local mode = ARGV[1]
local exists = redis.call('EXISTS', KEYS[1]) == 1
if mode == 'open' and exists then return {'exists'} end
if mode ~= 'open' and not exists then
  redis.call('DEL', KEYS[3])
  return {'no_account'}
end

local delta = tonumber(ARGV[2])
if mode == 'open' then
  redis.call('HSET', KEYS[1], 'status', 'active', 'balance', ARGV[2], 'held', 0, 'open_holds', 0,
    'tokens', 0, 'requests', 0, 'cost', 0, 'rpm_win', 0, 'rpm_cur', 0, 'rpm_prev', 0)
elseif mode == 'cycle' then
  local current = tonumber(redis.call('HGET', KEYS[1], 'balance'))
  local balance = tonumber(ARGV[2])
  if ARGV[13] == '1' and current > 0 then balance = balance + current end
  delta = balance - current
  redis.call('HSET', KEYS[1], 'balance', string.format('%.0f', balance), 'tokens', 0, 'requests', 0, 'cost', 0)
  redis.call('HDEL', KEYS[1], 'warned_credits', 'warned_tokens', 'warned_requests')
else
  redis.call('HINCRBY', KEYS[1], 'balance', ARGV[2])
end
if mode ~= 'add' then
  redis.call('HSET', KEYS[1], 'cycle_start', ARGV[10], 'cycle_end', ARGV[11], 'auto_renew', ARGV[12])
end
if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'tier', ARGV[9]) end

local balance = redis.call('HGET', KEYS[1], 'balance')
redis.call('XADD', KEYS[2], '*', 'kind', ARGV[6], 'id', ARGV[3], 'user', ARGV[5],
  'amount', string.format('%.0f', delta), 'balance', balance, 'ts', ARGV[4], 'reason', ARGV[7])
return {'ok', balance}
