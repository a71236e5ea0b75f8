-- accept: records new events as `pending` and due for the sweeper's look.
-- KEYS:  none (key names are built from the prefix: ev:<id>, due, open:<kind>, report:<day>)
-- ARGV:  prefix, ledger_ttl, report_ttl, redeliver_after, then per event:
--        id, day, buyer, event_json, kind
-- Reply: the ledger's time, then per event 1 (accepted) or 0 (already known)
local ttl, report_ttl, redeliver = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {now_text}
for i = 5, #ARGV, 5 do
  local id, day, buyer, kind = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 4]
  local key = prefix .. 'ev:' .. id
  if redis.call('EXISTS', key) == 1 then
    out[#out + 1] = 0
  else
    redis.call('HSET', key, 'event', ARGV[i + 3], 'state', 'pending', 'day', day,
      'buyer', buyer, 'kind', kind, 'accepted_at', now_text, 'sent_at', now_text, 'claim', 0)
    opened(kind, 1)
    -- No expiry while the event is open: its record must outlive any wait (a fleet down for
    -- longer than the ledger TTL must still find it, end it and archive it). It expires
    -- CGRID_LEDGER_TTL_S after it becomes final.
    redis.call('ZADD', prefix .. 'due', now + redeliver, id)
    bump(day, buyer, 'events', report_ttl)
    out[#out + 1] = 1
  end
end
write_bumps()
return out
