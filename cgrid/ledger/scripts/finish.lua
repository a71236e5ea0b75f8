#!lua flags=allow-oom
-- finish: writes the outcomes of claimed attempts of one attempt number.
-- KEYS:  none (key names are built from the prefix: ev:<id>, due, report:<day>,
--        failed:<day>:<buyer>, open:<kind>, archive, leases, leases:shared, lease:<token>)
-- A success that arrives after the sweeper gave its attempt up for lost still counts: a
-- first attempt's cancels the retry; a retry's turns `failed` into `delivered`.
-- ARGV:  prefix, attempt n, ledger_ttl, report_ttl, retry_delay, then per event: id, outcome,
--        attempt_json, reason, the buyer's retry delay ('' = the default), the call's latency
--        bucket ('' = no call), the event as its final record keeps it ('' = made here), and
--        the archive line of a first attempt's delivery, made by the worker in two parts
--        (cgrid.ledger.delivered_line_parts; '' = none: made here), and the token of the
--        claim that took the attempt ('' = unknown): a first attempt a shared claim took off
--        the pending list has no claim fields (claim.lua), and is known as ours by it
-- Reply: the new state per event ('' if the attempt was not ours)
local n, ttl, report_ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local default_delay = tonumber(ARGV[5])
local ttl_text = num_text(ttl)
local due = prefix .. 'due'
local out = {}
-- Claims under a lease (claim.lua): the attempts this ends, per claim, are counted off it.
local leased, ended = {}, {}
local function under_lease(token)
  if not token then return false end
  local known = leased[token]
  if known == nil then
    known = redis.call('EXISTS', prefix .. 'lease:' .. token) == 1
    leased[token] = known
  end
  return known
end
-- Per event: one HMGET reads all the script needs (the archive line too), one HSET writes
-- the new fields.
for i = 6, #ARGV, 9 do
  local id, outcome, attempt, reason = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local delay = tonumber(ARGV[i + 4]) or default_delay
  local bucket, final_event, line_parts, token = ARGV[i + 5], ARGV[i + 6], ARGV[i + 7], ARGV[i + 8]
  local key = prefix .. 'ev:' .. id
  local rec = redis.call('HMGET', key, 'state', 'claim', 'day', 'buyer', 'a1', 'a2', 'kind', 'accepted_at',
    'reason', 'claim_id', 'sent_at', 'wait')
  local state, claim, day, buyer = rec[1], tonumber(rec[2] or '0'), rec[3], rec[4]
  -- A first attempt a shared claim took off the list (no claim fields), named by its token.
  local bare = n == 1 and claim == 0 and token ~= '' and open_off_list(state, rec[5], rec[12], rec[11])
  local new, was_final = '', false
  local akey = 'a' .. n
  local attempts = {rec[5], rec[6]}  -- as the record holds them once this is written
  local written = nil  -- the attempt this writes, if any
  local new_reason = nil  -- the reason this writes, if any
  -- Its due entry: one made at the accept or by the sweeper (sent_at), or its claim's own
  -- when the claim has no lease (a pull, or a worker of an earlier version).
  local in_due = true
  if bare then
    if under_lease(token) then ended[token] = (ended[token] or 0) + 1 end
    in_due = false
  end
  if claim == n or bare then
    if not bare and under_lease(rec[10]) then
      ended[rec[10]] = (ended[rec[10]] or 0) + 1
      in_due = rec[11] ~= false  -- (a field the hash lacks reads false)
    end
    if attempt ~= '' then written = attempt end
    if outcome == 'ok' or outcome == 'unexpected' then
      new = 'delivered'
      bump(day, buyer, n == 1 and 'delivered_first' or 'delivered_retry', report_ttl)
      if outcome == 'unexpected' then bump(day, buyer, 'unexpected', report_ttl) end
    elseif outcome == 'fail' and n == 1 then
      new = 'retry_scheduled'
      if written then
        redis.call('HSET', key, 'claim', 0, akey, written, 'retry_at', stamp(now + delay), 'state', new)
      else
        redis.call('HSET', key, 'claim', 0, 'retry_at', stamp(now + delay), 'state', new)
      end
      redis.call('HDEL', key, 'sent_at')
      redis.call('ZADD', due, now + delay, id)
    elseif outcome == 'fail' then
      new = 'failed'
      bump(day, buyer, 'failed', report_ttl)
      note_failed(day, buyer, id, ttl)
    else
      new = outcome
      new_reason = reason
      bump(day, buyer, outcome, report_ttl)
      if outcome == 'expired' then note_failed(day, buyer, id, ttl) end
    end
  elseif n == 1 and (outcome == 'ok' or outcome == 'unexpected') and state == 'retry_scheduled'
      and claim == 0 and not rec[6] and rec[5] and string.find(rec[5], '"error":"lost"', 1, true) then
    -- The sweeper gave this attempt up for lost, but it did succeed: keep the truth and
    -- cancel the retry, so a success is never followed by a second call.
    new = 'delivered'
    written = attempt
    bump(day, buyer, 'delivered_first', report_ttl)
    if outcome == 'unexpected' then bump(day, buyer, 'unexpected', report_ttl) end
  elseif n == 2 and (outcome == 'ok' or outcome == 'unexpected') and state == 'failed'
      and rec[6] and string.find(rec[6], '"error":"lost"', 1, true) then
    -- The same for a retry: the sweeper gave it up for lost and the event ended failed, but
    -- the call did succeed. It ends delivered: its failed count and its place in the replay
    -- set are taken back, and the archive gets a second line for it, `delivered`, after its
    -- `failed` one (docs/archive.md). It was final already: it stays off the backlog.
    new, was_final = 'delivered', true
    written = attempt
    new_reason = 'attempt 2 was given up as lost, then its success arrived: delivered, not failed'
    bump(day, buyer, 'delivered_retry', report_ttl)
    bump(day, buyer, 'failed', report_ttl, -1)
    if outcome == 'unexpected' then bump(day, buyer, 'unexpected', report_ttl) end
    redis.call('SREM', prefix .. 'failed:' .. day .. ':' .. buyer, id)
  end
  if new ~= '' then
    if bucket ~= '' then bump(day, buyer, 'lat_' .. bucket, report_ttl) end
    if new ~= 'retry_scheduled' then
      -- (the worker made it keeping the URL for a failed or an expired event)
      local event, readable = final_event, true
      if final_event == '' or (new == 'failed' or new == 'expired') ~= (outcome == 'fail' or outcome == 'expired') then
        event, readable = final_event_of(redis.call('HGET', key, 'event'), new)
      end
      local fields = {'state', new}
      if written then
        attempts[n] = written
        fields[#fields + 1] = akey
        fields[#fields + 1] = written
      end
      if new_reason then
        fields[#fields + 1] = 'reason'
        fields[#fields + 1] = new_reason
      end
      if event then
        fields[#fields + 1] = 'event'
        fields[#fields + 1] = event
      end
      redis.call('HSET', key, unpack(fields))
      if in_due then redis.call('ZREM', due, id) end
      -- (a first attempt claimed when pending, under a lease: no sent_at, no retry_at)
      if not was_final then
        closed(key, rec[7], bare and 'none' or (n == 1 and state == 'pending' and not rec[11] and 'claim' or nil))
      end
      redis.call('EXPIRE', key, ttl_text)
      -- The worker's line is for a first attempt delivered as it claimed it, the record
      -- holding no reason and an acceptance time; any other line is made here.
      if line_parts ~= '' and n == 1 and (claim == n or bare) and new == 'delivered' and rec[8] and not rec[9]
          and event == final_event and archive_enabled() and archive_batch then
        archive_made(line_parts, rec[8])
      else
        archive_line(id, new, day, buyer, rec[7], rec[8], attempts[1], attempts[2], new_reason or rec[9], event,
          readable)
      end
    end
  end
  out[#out + 1] = new
end
count_off_leases(ended, true)
flush_archive()  -- the archive entry of the records this script made final
write_bumps()
return out
