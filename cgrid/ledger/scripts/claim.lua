#!lua flags=allow-oom
-- claim: claims attempt n of each id that may have it. This is the one-retry guard:
-- attempt n of an event can be claimed once, attempt 2 only after attempt 1 failed.
-- KEYS:  none (key names are built from the prefix: ev:<id>, watermark:<queue>,
--        parked:<buyer>, pending:<queue>, trigger:<queue>, leases, leases:shared,
--        lease:<token>)
-- ARGV:  prefix, attempt n, lease_s, sent_at (of the trigger, by this clock), the queue the
--        trigger came from, this claim's token (random, made by the caller), then the ids;
--        or, for a shared trigger, '' then how many ids to take from P pending:<queue>, how
--        long the trigger sent on is taken to be on its way (ms), and '1' when the caller
--        claims this queue again soon itself (a claim run: worker/follow.py), else ''
-- Reply: {id, event_json} per claimed event, then '|', this claim's stamp (its token), how
--        many ids stay in P pending:<queue> (0 for ids given), then the claimed events'
--        buyers that have parked events
-- A claim sent again with the same token (its reply was lost: redis-py or ride_out_redis
-- sent it again) gets the events it had claimed again, with those it can claim now.
-- The lease: one per claim, not one per event. The claim's ids (a shared trigger's: all it
-- took from the list, so that one sent again takes the same ids, not new ones) and how many
-- of its attempts are open go in P lease:<token>, its end in P leases; the finish and park
-- scripts count the attempts down and drop both at 0; the sweeper ends a claim whose lease
-- passed with attempts still open (their worker is gone). No due entry per event: a ZADD at
-- the claim and a ZREM at the finish were a tenth of Redis's work per event.
-- When ids stay in the list, the caller sends the shared trigger on (P trigger:<queue> is
-- set again for that); the claim that leaves it empty deletes P trigger:<queue>, so the next
-- accept asks for a new trigger, unless its caller claims the queue again soon (a claim
-- run): then P trigger:<queue> is set again, and accepts send no trigger meanwhile.
-- A shared trigger's claim writes nothing into the records of the events it takes off the
-- list when they were accepted for a shared trigger (no sent_at): an id is in the list once,
-- so the list's LPOP is that first attempt's claim, and its lease (P leases:shared, and
-- P lease:<token> with the ids and the claim's time, `at`) says which claim took it; the
-- finish and park scripts know it by the token the worker sends, and the sweeper counts an
-- attempt of a passed lease open while its record is still `pending` with no attempt, no
-- wait and no sent_at. (A claim field per record, written here and deleted by the finish,
-- was a fifth of Redis's work per event.) An event with sent_at (ids sent in its trigger,
-- or a publisher of an earlier version) is claimed with the record's claim fields, as by ids.
-- The leases of shared claims are in P leases:shared, not P leases: a sweeper of an earlier
-- version reads only P leases, and would drop a lease whose attempts it cannot see open.
local n, lease, sent_at, token = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[6]
local wm_key = prefix .. 'watermark:' .. ARGV[5]
local n_text, lease_end = num_text(n), num_text(now + lease)
local wm = tonumber(redis.call('GET', wm_key) or '0')
-- (never past this script's own time: a trigger stamped in the future must not make every
-- older trigger of its queue look lost)
if sent_at > wm then
  if sent_at > now then redis.call('SET', wm_key, now_text) else redis.call('SET', wm_key, ARGV[4]) end
end
local ids, left = {}, 0
local lease_key = prefix .. 'lease:' .. token
local ids_text = nil  -- the ids this claim keeps under its lease (a shared claim's: all it took)
local shared, resent = ARGV[7] == '', false
if shared then
  local pending, flag = prefix .. 'pending:' .. ARGV[5], prefix .. 'trigger:' .. ARGV[5]
  local before = redis.call('HGET', lease_key, 'ids')  -- (ids are printable ASCII: a newline parts them)
  resent = before ~= nil and before ~= false
  if before then
    for id in string.gmatch(before, '[^\n]+') do ids[#ids + 1] = id end
  else
    ids = redis.call('LPOP', pending, tonumber(ARGV[8])) or {}
    if #ids > 0 then ids_text = table.concat(ids, '\n') end
  end
  left = redis.call('LLEN', pending)
  if left > 0 then
    redis.call('SET', flag, now_text, 'PX', ARGV[9])
  elseif ARGV[10] == '1' then
    -- (a run claims every few ms: its mark is set again only when half its hold has passed,
    -- so a claim that finds nothing writes nothing)
    if redis.call('PTTL', flag) < tonumber(ARGV[9]) / 2 then redis.call('SET', flag, now_text, 'PX', ARGV[9]) end
  else
    redis.call('DEL', flag)
  end
else
  for i = 7, #ARGV do ids[#ids + 1] = ARGV[i] end
end
local out = {}
local seen, parked = {}, {}
local new_claims, mine = 0, {}
local taken, any_bare = {}, false  -- the ids this claim holds; whether any has no claim fields
for _, id in ipairs(ids) do
  local key = prefix .. 'ev:' .. id
  -- (a retry's claim also reads a2 and retry_at; the claim's token is read only when needed)
  local rec
  if n == 1 then
    rec = redis.call('HMGET', key, 'state', 'claim', 'a1', 'event', 'wait', 'buyer', 'sent_at')
  else
    rec = redis.call('HMGET', key, 'state', 'claim', 'a1', 'event', 'wait', 'buyer', 'a2', 'retry_at')
  end
  local state, claim = rec[1], tonumber(rec[2] or '0')
  local bare = shared and n == 1 and not rec[7]  -- claimed by the list alone: no claim fields
  local ok, again = false, false
  -- A parked event (wait set) is claimed by its lane's pull, never by a stray trigger.
  if taken[id] then
    ok = false  -- (an id twice in one batch: claimed once)
  elseif claim == 0 and not rec[5] then
    if n == 1 then
      ok = state == 'pending' and not rec[3]
      again = ok and bare and resent  -- this claim's own, sent again: no fields say so
      -- By ids, only an event whose trigger carries them (sent_at: the accept's, the
      -- sweeper's): one accepted for a shared trigger is in its pending list, or a shared
      -- claim took it off the list, and no field of its record says so.
      if not shared and not rec[7] then ok = false end
    else
      ok = state == 'retry_scheduled' and rec[3] and not rec[7]
        and now >= tonumber(rec[8] or '0') - 1
    end
  elseif claim == n and redis.call('HGET', key, 'claim_id') == token then
    ok, again = true, true  -- this claim's own, sent again: its lease starts now
  end
  if ok then
    taken[id] = true
    if bare then any_bare = true end
    if not again then
      if not bare then redis.call('HSET', key, 'claim', n_text, 'claimed_at', now_text, 'claim_id', token) end
      new_claims = new_claims + 1
    end
    mine[#mine + 1] = id
    out[#out + 1] = id
    out[#out + 1] = rec[4]
    local buyer = rec[6]
    if buyer and not seen[buyer] then
      seen[buyer] = true
      if redis.call('EXISTS', prefix .. 'parked:' .. buyer) == 1 then parked[#parked + 1] = buyer end
    end
  end
end
-- The lease (for all this claim's attempts: those claimed again restart it too).
if ids_text or #mine > 0 then
  if new_claims > 0 or ids_text then
    redis.call('HSET', lease_key, 'ids', ids_text or table.concat(mine, '\n'), 'at', now_text)
  end
  if new_claims > 0 then redis.call('HINCRBY', lease_key, 'open', new_claims) end
  -- (a claim of records with claim fields only keeps its lease where every sweeper looks)
  redis.call('ZADD', prefix .. (any_bare and 'leases:shared' or 'leases'), lease_end, token)
end
-- Then this claim's stamp (its token: a park must show it, see park.lua), and the claimed
-- events' buyers that have parked events: their lanes must pull them (a worker that parked
-- them may be gone) and let new events wait behind them.
out[#out + 1] = '|'
out[#out + 1] = token
out[#out + 1] = left
for _, buyer in ipairs(parked) do out[#out + 1] = buyer end
return out
