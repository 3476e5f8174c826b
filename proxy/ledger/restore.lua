-- Write an account rebuilt from Postgres (`costproxy ledger rebuild`): the whole hash at
-- once, stamped `rebuilt` (now) so the post of a hold lost with Redis's data is still
-- charged (see resolve.lua). What Postgres shows as already done is marked so its replay
-- is a duplicate: each hold settled lately (a spool may still send its settlement) and each
-- grant, refund and reset applied (Stripe redelivers events; grant.lua's markers).
-- An existing account is left alone unless forced.
--
-- `held` and `open_holds` are those of the account's holds still pending in the shard's
-- holds set (none after a data loss; a forced rebuild of a live account keeps its requests
-- in flight accounted, so their settlements release exactly what they hold).
--
-- The shard's ledger stream is first raised to give ids after the last entry Postgres has:
-- a stream lost with the data (or recreated empty, at 0-0, by a worker) would otherwise
-- number new entries before old ones, and Postgres orders the ledger by these ids.
--
-- KEYS: 1 account hash, 2 ledger stream of its shard, 3 holds zset of its shard, then the
-- marker of each hold settled lately, then the marker of each event applied
-- ARGV: 1 "force" | "", 2 how many hold markers, 3 hold marker ttl ms, 4 event marker ttl
-- ms, 5 id of the last ledger entry in Postgres ("<ms>-<seq>", or "" if none), 6 user id,
-- then field, value pairs
-- Returns "restored", or "exists" (not forced).
local function parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

if ARGV[5] ~= '' then
  local ms, seq = parts(ARGV[5])
  if redis.call('EXISTS', KEYS[2]) == 0 then
    redis.call('XADD', KEYS[2], ARGV[5], 'kind', 'floor')
    redis.call('XDEL', KEYS[2], ARGV[5])
  else
    local info = redis.call('XINFO', 'STREAM', KEYS[2])
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then
        local last_ms, last_seq = parts(info[i + 1])
        if last_ms < ms or (last_ms == ms and last_seq < seq) then redis.call('XSETID', KEYS[2], ARGV[5]) end
      end
    end
  end
end

if ARGV[1] ~= 'force' and redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end

local held, open_holds = 0, 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  local account, amount = string.match(member, '^[^|]+|([^|]+)|(%d+)$')
  if account == ARGV[6] then held, open_holds = held + tonumber(amount), open_holds + 1 end
end

redis.call('DEL', KEYS[1])
local fields = {'held', string.format('%.0f', held), 'open_holds', open_holds}
for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
local hold_markers = tonumber(ARGV[2])
for i = 4, #KEYS do
  redis.call('SET', KEYS[i], '1', 'PX', i < 4 + hold_markers and ARGV[3] or ARGV[4])
end
return 'restored'
