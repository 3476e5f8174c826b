-- Read one account as it stands at one instant, with where its shard's ledger stream has
-- got to then (`costproxy ledger check` compares this with Postgres up to that entry).
--
-- KEYS: 1 account hash, 2 holds zset of its shard, 3 ledger stream of its shard
-- Returns {account hash as a flat list, holds zset with scores as a flat list, id of the
-- last entry the stream was given (entries the worker wrote are deleted, the id stays), or
-- "" when the stream does not exist}.
local last = ''
if redis.call('EXISTS', KEYS[3]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[3])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
end
return {redis.call('HGETALL', KEYS[1]), redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES'), last}
