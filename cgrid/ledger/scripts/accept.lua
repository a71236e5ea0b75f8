-- accept: records new events as `pending`: waiting in their queue's pending list for a
-- shared trigger, or (ids sent in the trigger) due for the sweeper's look.
-- KEYS:  none (key names are built from the prefix: ev:<id>, due, open:<kind>, report:<day>,
--        pending:<queue>, trigger:<queue>)
-- ARGV:  prefix, ledger_ttl, report_ttl, redeliver_after, max_memory_share, the queue of the
--        batch's shared trigger ('' = none: the caller sends a trigger with the ids), how
--        long a shared trigger is taken to be on its way (ms), then per event: id, day,
--        buyer, event_json, kind
-- Reply: the ledger's time, 1 if the caller must send a shared trigger (else 0), then per
--        event 1 (accepted) or 0 (already known); or an OOM error when Redis's memory is
--        past max_memory_share of its maxmemory
-- Shared triggers (worker/batch.py): the new ids are appended to P pending:<queue>, and a
-- trigger is asked for only when none is on its way (P trigger:<queue>, set here for
-- hold_ms, deleted by the claim that empties the list): many publishers share one.
-- No `allow-oom` flag, unlike the scripts that move accepted events on: a full Redis refuses
-- new events, and (max_memory_share < 1) they are refused before it is full, so that the
-- events already accepted have room to end.
local ttl, report_ttl, redeliver = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local share = tonumber(ARGV[5])
local shared_queue, hold_ms = ARGV[6], ARGV[7]
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
local out = {now_text, 0}
local new_ids = {}
for i = 8, #ARGV, 5 do
  local id, day, buyer, kind = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 4]
  local key = prefix .. 'ev:' .. id
  if redis.call('EXISTS', key) == 1 then
    out[#out + 1] = 0
  else
    -- No expiry while the event is open: its record must outlive any wait (a fleet down for
    -- longer than the ledger TTL must still find it, end it and archive it). It expires
    -- CGRID_LEDGER_TTL_S after it becomes final.
    if shared_queue == '' then
      -- Its trigger carries its id: it is due for the sweeper's look once that trigger may
      -- be lost (sent_at, the trigger's time, tells the sweeper so).
      redis.call('HSET', key, 'event', ARGV[i + 3], 'state', 'pending', 'day', day,
        'buyer', buyer, 'kind', kind, 'accepted_at', now_text, 'sent_at', now_text)
      redis.call('ZADD', prefix .. 'due', due_at, id)
    else
      -- It waits in its queue's pending list, which the sweeper watches (a list without a
      -- trigger on its way gets one: Ledger.orphaned_pending); the claim that takes it puts
      -- it under the claim's lease (claim.lua). No sent_at, no due entry: a write each spared.
      redis.call('HSET', key, 'event', ARGV[i + 3], 'state', 'pending', 'day', day,
        'buyer', buyer, 'kind', kind, 'accepted_at', now_text)
    end
    opened(kind, 1)
    bump(day, buyer, 'events', report_ttl)
    new_ids[#new_ids + 1] = id
    out[#out + 1] = 1
  end
end
if shared_queue ~= '' and #new_ids > 0 then
  for start = 1, #new_ids, 1000 do
    redis.call('RPUSH', prefix .. 'pending:' .. shared_queue, unpack(new_ids, start, math.min(start + 999, #new_ids)))
  end
  if redis.call('SET', prefix .. 'trigger:' .. shared_queue, now_text, 'NX', 'PX', hold_ms) then out[2] = 1 end
end
write_bumps()
return out
