-- accept: records new events as `pending` and due for the sweeper's look.
-- KEYS:  none (key names are built from the prefix: ev:<id>, due, open:<kind>, report:<day>)
-- ARGV:  prefix, ledger_ttl, report_ttl, redeliver_after, max_memory_share, then per event:
--        id, day, buyer, event_json, kind
-- Reply: the ledger's time, then per event 1 (accepted) or 0 (already known); or an OOM
--        error when Redis's memory is past max_memory_share of its maxmemory
-- No `allow-oom` flag, unlike the scripts that move accepted events on: a full Redis refuses
-- new events, and (max_memory_share < 1) they are refused before it is full, so that the
-- events already accepted have room to end.
local ttl, report_ttl, redeliver = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local share = tonumber(ARGV[5])
local due_at = num_text(now + redeliver)
if share < 1 then
  local info = redis.pcall('INFO', 'memory')  -- an error (an ACL without INFO): no headroom check
  if type(info) == 'string' then
    local used = tonumber(string.match(info, 'used_memory:(%d+)'))
    local max = tonumber(string.match(info, 'maxmemory:(%d+)'))
    if used and max and max > 0 and used > max * share then
      return redis.error_reply(string.format('OOM used memory %d bytes is past %g of maxmemory %d bytes ' ..
        '(CGRID_PUBLISH_MAX_MEMORY_SHARE): new events are refused, accepted ones are still delivered',
        used, share, max))
    end
  end
end
local out = {now_text}
for i = 6, #ARGV, 5 do
  local id, day, buyer, kind = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 4]
  local key = prefix .. 'ev:' .. id
  if redis.call('EXISTS', key) == 1 then
    out[#out + 1] = 0
  else
    redis.call('HSET', key, 'event', ARGV[i + 3], 'state', 'pending', 'day', day,
      'buyer', buyer, 'kind', kind, 'accepted_at', now_text, 'sent_at', now_text)
    opened(kind, 1)
    -- No expiry while the event is open: its record must outlive any wait (a fleet down for
    -- longer than the ledger TTL must still find it, end it and archive it). It expires
    -- CGRID_LEDGER_TTL_S after it becomes final.
    redis.call('ZADD', prefix .. 'due', due_at, id)
    bump(day, buyer, 'events', report_ttl)
    out[#out + 1] = 1
  end
end
write_bumps()
return out
