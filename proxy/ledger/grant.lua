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
local TOTAL = 4503599627370496  -- 2^52: no balance may grow beyond this
local delta = string.match(ARGV[2], '^-?%d+$') and tonumber(ARGV[2])
if not delta or math.abs(delta) > 1125899906842624 then
  return redis.error_reply('ERR costproxy: not an integer within 2^50: ' .. tostring(ARGV[2]))
end

local mode = ARGV[1]
if mode ~= 'open' and mode ~= 'add' and mode ~= 'cycle' then
  return redis.error_reply('ERR costproxy: unknown grant mode: ' .. tostring(mode))
end
if mode ~= 'add' then
  for i = 10, 11 do
    if not string.match(ARGV[i] or '', '^%d+$') then
      return redis.error_reply('ERR costproxy: cycle bounds must be integers: ' .. tostring(ARGV[i]))
    end
  end
end
local exists = redis.call('EXISTS', KEYS[1]) == 1
if mode == 'open' and exists then return {'exists'} end
if mode ~= 'open' and not exists then return {'no_account'} end

-- Everything is checked before the event is marked applied: a refused call leaves it unused.
local current = exists and tonumber(redis.call('HGET', KEYS[1], 'balance')) or 0
local balance = delta
if mode == 'add' then
  balance = current + delta
elseif mode == 'cycle' and ARGV[13] == '1' and current > 0 then
  balance = delta + current
end
if math.abs(balance) > TOTAL then return redis.error_reply('ERR costproxy: the balance would exceed 2^52') end
if redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[8]) == false then return {'dup'} end
delta = balance - current

local function int(n) return string.format('%.0f', n) end
if mode == 'open' then
  redis.call('HSET', KEYS[1], 'status', 'active', 'balance', int(balance), 'held', 0, 'open_holds', 0,
    'tokens', 0, 'requests', 0, 'cost', 0, 'rpm_win', 0, 'rpm_cur', 0, 'rpm_prev', 0)
elseif mode == 'cycle' then
  redis.call('HSET', KEYS[1], 'balance', int(balance), 'tokens', 0, 'requests', 0, 'cost', 0)
  redis.call('HDEL', KEYS[1], 'warned_credits', 'warned_tokens', 'warned_requests')
else
  redis.call('HSET', KEYS[1], 'balance', int(balance))
end
if mode ~= 'add' then
  redis.call('HSET', KEYS[1], 'cycle_start', ARGV[10], 'cycle_end', ARGV[11], 'auto_renew', ARGV[12])
end
if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'tier', ARGV[9]) end

local entry = {'kind', ARGV[6], 'id', ARGV[3], 'user', ARGV[5],
  'amount', int(delta), 'balance', int(balance), 'ts', ARGV[4], 'reason', ARGV[7]}
if mode ~= 'add' then  -- a cycle starts: Postgres keeps its bounds, so Redis can be rebuilt
  for _, v in ipairs({'cycle_start', ARGV[10], 'cycle_end', ARGV[11], 'auto_renew', ARGV[12]}) do
    entry[#entry + 1] = v
  end
end
redis.call('XADD', KEYS[2], '*', unpack(entry))
return {'ok', int(balance)}
