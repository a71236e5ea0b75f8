#!lua flags=allow-oom
-- withdraw: takes back events an accept recorded that no replica holds
-- (CGRID_REDIS_WAIT_REPLICAS): each still untouched (pending, never claimed, accepted at
-- that time) is deleted and its counters undone, so an event the producer was told is not
-- accepted is never called.
-- An event the accept added to a pending list leaves it; one no longer there was taken off
-- it by a shared trigger's claim, which writes no claim fields (claim.lua): it is in use.
-- KEYS:  none (key names are built from the prefix: ev:<id>, due, open:<kind>, report:<day>,
--        pending:<queue>)
-- ARGV:  prefix, the accept's time (accepted_at), the queue whose pending list the accept
--        added the events to ('' = none: ids sent in their trigger), then per event: id, day,
--        buyer, kind
-- Reply: per event, 1 (withdrawn) or 0 (already in use: it stays, and will be delivered)
local out = {}
local pending = ARGV[3] ~= '' and prefix .. 'pending:' .. ARGV[3] or nil
for i = 4, #ARGV, 4 do
  local id, day, buyer, kind = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local key = prefix .. 'ev:' .. id
  local rec = redis.call('HMGET', key, 'state', 'claim', 'accepted_at', 'a1')
  -- (from the list's end: the accept has just added it there, behind every id a claim can
  -- take first, so one a claim took is gone only from a list short enough to scan)
  if rec[1] == 'pending' and tonumber(rec[2] or '0') == 0 and rec[3] == ARGV[2] and not rec[4]
      and (not pending or redis.call('LREM', pending, -1, id) == 1) then
    redis.call('DEL', key)
    redis.call('ZREM', prefix .. 'due', id)
    redis.call('INCRBY', prefix .. 'open:' .. kind, -1)
    redis.call('HINCRBY', prefix .. 'report:' .. day, buyer .. '\t' .. 'events', -1)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
