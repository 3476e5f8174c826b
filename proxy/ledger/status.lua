-- Set an account's status, if the account exists (an HSET alone would create a hash
-- holding nothing but a status, which `ledger rebuild` would then take for an account).
--
-- KEYS: 1 account hash
-- ARGV: 1 status ("active" | "past_due" | "suspended")
-- Returns 1, or 0 when there is no such account.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
return 1
