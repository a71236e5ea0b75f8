#!lua flags=allow-oom
-- withdraw: takes back events an accept recorded that no replica holds
-- (CGRID_REDIS_WAIT_REPLICAS): each still untouched (pending, never claimed, accepted at
-- that time) is deleted and its counters undone, so an event the producer was told is not
-- accepted is never called.
-- KEYS:  none (key names are built from the prefix: ev:<id>, due, open:<kind>, report:<day>)
-- ARGV:  prefix, the accept's time (accepted_at), then per event: id, day, buyer, kind
-- Reply: per event, 1 (withdrawn) or 0 (already in use: it stays, and will be delivered)
local out = {}
for i = 3, #ARGV, 4 do
  local id, day, buyer, kind = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local key = prefix .. 'ev:' .. id
  local rec = redis.call('HMGET', key, 'state', 'claim', 'accepted_at', 'a1')
  if rec[1] == 'pending' and tonumber(rec[2] or '0') == 0 and rec[3] == ARGV[2] and not rec[4] then
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
