#!lua flags=allow-oom
-- sweep: looks at events whose due time has passed (lost claims end their attempt `lost`;
-- due retries and lost triggers are sent), and at parked sets no worker has touched for
-- revive_after (their workers are gone): a few of those are sent again as triggers. A paused
-- buyer's parked events are left alone, but those past its maximum age end `expired`.
-- It also ends the claims whose lease passed with attempts still open (leases and
-- leases:shared, claim.lua): their workers are gone, and those attempts count as lost.
-- KEYS:  none (key names are built from the prefix: due, ev:<id>, parked:<buyer>,
--        idx:parked-activity, watermark:<queue>, report:<day>, failed:<day>:<buyer>, archive,
--        leases, leases:shared, lease:<token>;
--        and parked:activity, the index's former name (its entries are moved here as found);
--        the broker's queues are not read here: they may live on another Redis)
-- ARGV:  prefix, limit, redeliver_after, retry_delay, report_ttl, deliver queue,
--        revive_after, revive_batch, ledger_ttl, retry queue, the number of buyers with
--        queues of their own, then per such buyer: its id, its first-attempt queue and its
--        retry queue; then how many queues the sweeper found empty on the broker and their
--        names; then how many buyers have their own retry delay and those (buyer, delay)
--        pairs; then per paused buyer: its id and maximum event age
-- Reply: {time, number of sections, then per section: attempt n, queue, count, ids...}
local limit, redeliver = tonumber(ARGV[2]), tonumber(ARGV[3])
local delay, report_ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local revive_after, revive_batch, ledger_ttl = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local default_queue = {ARGV[6], ARGV[10]}
local routed, n_routed = {}, tonumber(ARGV[11])
for i = 12, 11 + 3 * n_routed, 3 do routed[ARGV[i]] = {ARGV[i + 1], ARGV[i + 2]} end
local function queue_of(buyer, n)
  return (routed[buyer] or default_queue)[n]
end
-- The queues the sweeper found empty on the broker, just before this sweep (it reads them
-- there: CGRID_BROKER_URL may be another Redis).
local empty_at = 12 + 3 * n_routed
local empty = {}
for i = empty_at + 1, empty_at + tonumber(ARGV[empty_at]) do empty[ARGV[i]] = true end
-- Per queue, read once: the newest sent_at of a trigger a worker started from it. Queues
-- are FIFO, so a trigger older than one already started (by more than redeliver) was lost,
-- and so is one whose queue is empty; another queue's progress says nothing about it.
local watermarks = {}
local function trigger_lost(queue, sent_at)
  if empty[queue] then return true end
  local wm = watermarks[queue]
  if not wm then
    wm = tonumber(redis.call('GET', prefix .. 'watermark:' .. queue) or '0')
    watermarks[queue] = wm
  end
  return wm > sent_at + redeliver
end
local sections, by_key = {}, {}
local function send(n, buyer, id)
  local queue = queue_of(buyer, n)
  local section = by_key[n .. queue]
  if not section then
    section = {n, queue}
    by_key[n .. queue] = section
    sections[#sections + 1] = section
  end
  section[#section + 1] = id
end
-- Then: how many buyers have their own retry delay, those (buyer, delay) pairs, and the
-- paused buyers' (buyer, maximum age) pairs.
local own_delay, delays_at = {}, empty_at + 1 + tonumber(ARGV[empty_at])
local n_delays = tonumber(ARGV[delays_at])
for i = delays_at + 1, delays_at + 2 * n_delays, 2 do own_delay[ARGV[i]] = tonumber(ARGV[i + 1]) end
local paused = {}
for i = delays_at + 1 + 2 * n_delays, #ARGV, 2 do
  local buyer, max_age = ARGV[i], tonumber(ARGV[i + 1])
  paused[buyer] = true
  local pkey = prefix .. 'parked:' .. buyer
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', pkey, '-inf', now - max_age, 'LIMIT', 0, limit)) do
    local key = prefix .. 'ev:' .. id
    local rec = redis.call('HMGET', key, 'state', 'claim', 'day', 'event', 'kind')
    if tonumber(rec[2] or '0') == 0 and (rec[1] == 'pending' or rec[1] == 'retry_scheduled') then
      redis.call('HSET', key, 'state', 'expired',
        'reason', 'past its maximum age of ' .. max_age .. 's while its buyer was paused')
      redis.call('HDEL', key, 'wait', 'waiting_since')
      closed(key, rec[5])
      local _, readable = finalize(key, rec[4], 'expired')
      redis.call('ZREM', prefix .. 'due', id)
      redis.call('EXPIRE', key, ledger_ttl)
      bump(rec[3], buyer, 'expired', report_ttl)
      note_failed(rec[3], buyer, id, ledger_ttl)
      archive(key, id, 'expired', readable)
    end
    redis.call('ZREM', pkey, id)
  end
end
local due = prefix .. 'due'
local leases, shared_leases = prefix .. 'leases', prefix .. 'leases:shared'
-- The attempt was claimed but never finished in its lease: its worker died. It counts as a
-- failed attempt (SPEC §5). rec: state, claim, claimed_at, sent_at, day, buyer, event, kind.
local function lost_attempt(key, id, rec, claim)
  local lost = '{"n":' .. claim .. ',"started_at":' .. (rec[3] or '0') ..
    ',"ms":null,"status":null,"error":"lost"}'
  redis.call('HSET', key, 'a' .. claim, lost, 'claim', 0)
  if claim == 1 then
    local retry_at = now + (own_delay[rec[6]] or delay)  -- the buyer's retry delay, if it has one
    redis.call('HSET', key, 'state', 'retry_scheduled', 'retry_at', stamp(retry_at))
    redis.call('HDEL', key, 'sent_at')
    redis.call('ZADD', due, retry_at, id)
  else
    redis.call('HSET', key, 'state', 'failed')
    redis.call('ZREM', due, id)
    closed(key, rec[8])
    local _, readable = finalize(key, rec[7], 'failed')
    redis.call('EXPIRE', key, ledger_ttl)
    bump(rec[5], rec[6], 'failed', report_ttl)
    note_failed(rec[5], rec[6], id, ledger_ttl)
    archive(key, id, 'failed', readable)
  end
end
-- Claims whose lease passed with attempts open: those still theirs are lost. (At most
-- about `limit` events a pass, as for the due set: a claim is taken whole, and the next
-- pass takes the claims left.)
-- A shared claim's first attempts have no claim fields: one of its lease is open while
-- open_off_list says so (common.lua), and its start is the claim's (the lease's `at`).
local looked_at = 0
for _, set in ipairs({leases, shared_leases}) do
  for _, token in ipairs(redis.call('ZRANGEBYSCORE', set, '-inf', now, 'LIMIT', 0, limit)) do
    if looked_at >= limit then break end
    local lease_key = prefix .. 'lease:' .. token
    local lease = redis.call('HMGET', lease_key, 'ids', 'at')
    for id in string.gmatch(lease[1] or '', '[^\n]+') do
      looked_at = looked_at + 1
      local key = prefix .. 'ev:' .. id
      local rec = redis.call('HMGET', key, 'state', 'claim', 'claimed_at', 'sent_at', 'day', 'buyer', 'event', 'kind',
        'claim_id', 'a1', 'wait')
      local claim = tonumber(rec[2] or '0')
      if claim ~= 0 and rec[9] == token and (rec[1] == 'pending' or rec[1] == 'retry_scheduled') then
        lost_attempt(key, id, rec, claim)
      elseif set == shared_leases and claim == 0 and open_off_list(rec[1], rec[10], rec[11], rec[4]) then
        rec[3] = lease[2]
        lost_attempt(key, id, rec, 1)
      end
    end
    redis.call('DEL', lease_key)
    redis.call('ZREM', set, token)
  end
end
local ids = redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(ids) do
  local key = prefix .. 'ev:' .. id
  local rec = redis.call('HMGET', key, 'state', 'claim', 'claimed_at', 'sent_at', 'day', 'buyer', 'event', 'kind',
    'claim_id')
  local state, claim = rec[1], tonumber(rec[2] or '0')
  local lease_end = nil
  if claim ~= 0 and rec[9] then
    local score = redis.call('ZSCORE', leases, rec[9]) or redis.call('ZSCORE', shared_leases, rec[9])
    if score then lease_end = tonumber(score) end
  end
  if not state or (state ~= 'pending' and state ~= 'retry_scheduled') then
    redis.call('ZREM', due, id)
  elseif claim ~= 0 and lease_end and lease_end > now then
    -- Claimed under a lease that has not passed (its due entry is from its trigger): looked
    -- at again when the lease ends.
    redis.call('ZADD', due, lease_end, id)
  elseif claim ~= 0 then
    lost_attempt(key, id, rec, claim)
  else
    local sent_at = tonumber(rec[4] or '-1')
    -- A trigger is (re)sent when none was sent yet (a due retry), or when the one sent
    -- must have been lost: its queue is empty, or workers already started newer ones from it.
    local n = state == 'pending' and 1 or 2
    if sent_at < 0 or trigger_lost(queue_of(rec[6], n), sent_at) then
      redis.call('HSET', key, 'sent_at', now_text)
      send(n, rec[6], id)
    end
    redis.call('ZADD', due, now + redeliver, id)
  end
end
local activity = prefix .. 'idx:parked-activity'
-- The index of parked sets was P parked:activity before, which is also the parked set of a
-- buyer named 'activity' (a running fleet's key, or one that workers not yet upgraded still
-- write): the buyer names found there move to the index; the events of that buyer stay (its
-- parked set), and the buyer is indexed.
local old_index = prefix .. 'parked:activity'
local old_entries = redis.call('ZREVRANGE', old_index, 0, 99, 'WITHSCORES')
for i = 1, #old_entries, 2 do
  local member = old_entries[i]
  if redis.call('HGET', prefix .. 'ev:' .. member, 'buyer') == 'activity' then
    redis.call('ZADD', activity, 'NX', now, 'activity')
  else
    redis.call('ZREM', old_index, member)
    redis.call('ZADD', activity, 'NX', tonumber(old_entries[i + 1]), member)
  end
end
for _, buyer in ipairs(redis.call('ZRANGEBYSCORE', activity, '-inf', now - revive_after, 'LIMIT', 0, 100)) do
  if paused[buyer] then
    redis.call('ZADD', activity, now, buyer)
  else
  local pkey = prefix .. 'parked:' .. buyer
  local popped = redis.call('ZPOPMIN', pkey, revive_batch)
  for i = 1, #popped, 2 do
    local id = popped[i]
    local key = prefix .. 'ev:' .. id
    local rec = redis.call('HMGET', key, 'state', 'claim')
    if tonumber(rec[2] or '0') == 0 and (rec[1] == 'pending' or rec[1] == 'retry_scheduled') then
      redis.call('HSET', key, 'sent_at', now_text)
      redis.call('HDEL', key, 'wait', 'waiting_since')
      redis.call('ZADD', due, now + redeliver, id)
      send(rec[1] == 'pending' and 1 or 2, buyer, id)
    end
  end
  if redis.call('ZCARD', pkey) == 0 then
    redis.call('ZREM', activity, buyer)
  else
    redis.call('ZADD', activity, now, buyer)
  end
  end
end
flush_archive()  -- the archive entry of the records this script made final
write_bumps()
local out = {now_text, #sections}
for _, section in ipairs(sections) do
  out[#out + 1] = section[1]
  out[#out + 1] = section[2]
  out[#out + 1] = #section - 2
  for j = 3, #section do out[#out + 1] = section[j] end
end
return out
