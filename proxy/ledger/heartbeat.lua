-- Keep live holds of one shard alive: push each one's expiry forward and record its
-- progress (what the request has cost so far), in one call per shard and beat. A hold no
-- longer in the zset (resolved, or expired and posted) is left alone.
--
-- KEYS: 1 holds zset, 2 progress hash
-- ARGV: 1 new expiry ms, then for each hold: its zset member, its id, its progress
--       record ("<cost µ$> <tokens> <usage JSON>")
-- Returns the number of holds renewed.
local expiry = tonumber(ARGV[1])
if expiry == nil or expiry ~= math.floor(expiry) then return redis.error_reply('ERR costproxy: bad expiry') end
local LIMIT = 1125899906842624  -- 2^50
for i = 4, #ARGV, 3 do
  local c, t = string.match(ARGV[i], '^(%d+) (%d+) .+$')
  if not c or tonumber(c) > LIMIT or tonumber(t) > LIMIT then
    return redis.error_reply('ERR costproxy: a progress record is "<cost> <tokens> <json>" within 2^50')
  end
end
local renewed = 0
for i = 2, #ARGV, 3 do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[i])
    redis.call('HSET', KEYS[2], ARGV[i + 1], ARGV[i + 2])
    renewed = renewed + 1
  end
end
return renewed
