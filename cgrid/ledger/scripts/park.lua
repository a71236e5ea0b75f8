#!lua flags=allow-oom
-- park: hands claimed attempts back unstarted: the claim is released, no attempt is
-- recorded, and the event waits in its buyer's parked set.
-- KEYS:  none (key names are built from the prefix: ev:<id>, due, parked:<buyer>,
--        idx:parked-activity, leases, leases:shared, lease:<token>)
-- ARGV:  prefix, then per event: id, attempt n, created_at, buyer, reason, the claim's stamp
--        (its token, from claim.lua or pull.lua; '' = any claim of attempt n). A first attempt
--        a shared claim took off the pending list has no claim fields (claim.lua): it is
--        known by its stamp (the claim's lease lists it), and as still open (pending, no
--        attempt, not parked, no sent_at).
-- Reply: per event, 1 (parked) or 0 (not ours)
local out = {}
local touched = {}  -- the buyers whose parked sets this touched: indexed once each, at the end
local ended = {}  -- per claim, the attempts handed back (counted off its lease, claim.lua)
-- The ids each named claim's lease lists ('\n' around each), read once per claim: a park of
-- an attempt with no claim fields holds only if the claim it names took that id here (after
-- a failover the new primary may have given the id to another claim, whose call is on).
local lease_ids = {}
local function lease_lists(token, id)
  local ids = lease_ids[token]
  if ids == nil then
    local text = redis.call('HGET', prefix .. 'lease:' .. token, 'ids')
    ids = text and ('\n' .. text .. '\n') or false
    lease_ids[token] = ids
  end
  return ids and string.find(ids, '\n' .. id .. '\n', 1, true) ~= nil
end
for i = 2, #ARGV, 6 do
  local id, n, buyer, reason, stamp = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  local key = prefix .. 'ev:' .. id
  local rec = redis.call('HMGET', key, 'claim', 'claim_id', 'state', 'a1', 'wait', 'sent_at')
  local claim = tonumber(rec[1] or '0')
  local bare = n == 1 and claim == 0 and stamp ~= '' and open_off_list(rec[3], rec[4], rec[5], rec[6])
    and lease_lists(stamp, id)
  -- Only the claim this park was made for: a park sent again after a lost reply must not
  -- take back the claim of the process that has pulled the event since.
  if bare or (claim == n and (stamp == '' or rec[2] == stamp)) then
    local token = bare and stamp or rec[2]
    if token then ended[token] = (ended[token] or 0) + 1 end
    if bare then
      redis.call('HSET', key, 'wait', reason, 'waiting_since', now_text)
    else
      redis.call('HSET', key, 'claim', 0, 'wait', reason, 'waiting_since', now_text)
      redis.call('HDEL', key, 'claim_id')
    end
    redis.call('ZREM', prefix .. 'due', id)
    redis.call('ZADD', prefix .. 'parked:' .. buyer, tonumber(ARGV[i + 2]), id)
    touched[buyer] = true
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
for buyer in pairs(touched) do redis.call('ZADD', prefix .. 'idx:parked-activity', now, buyer) end
count_off_leases(ended, false)
return out
