#!lua flags=allow-oom
-- pull: claims the next attempt of up to k parked events of a buyer, oldest first.
-- KEYS:  none (key names are built from the prefix: parked:<buyer>, ev:<id>, due,
--        idx:parked-activity, pulled:<token>)
-- ARGV:  prefix, buyer, k, lease, this pull's token (random, made by the caller)
-- Reply: {how many stay parked, this pull's stamp (its token), then n, id, event_json per
--        claim}
-- A pull sent again with the same token (its reply was lost) gets the events it had claimed
-- again (listed in P pulled:<token> for the lease), then pulls more up to k.
local buyer, k, lease, token = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local pkey = prefix .. 'parked:' .. buyer
local mine = prefix .. 'pulled:' .. token
local lease_end = num_text(now + lease)
local out = {0, token}  -- how many stay parked, this pull's stamp (its token), then claims
local got = 0
local later = {}
for _, id in ipairs(redis.call('SMEMBERS', mine)) do
  local key = prefix .. 'ev:' .. id
  local rec = redis.call('HMGET', key, 'claim', 'claim_id', 'event')
  if tonumber(rec[1] or '0') ~= 0 and rec[2] == token then
    redis.call('ZADD', prefix .. 'due', lease_end, id)
    out[#out + 1] = tonumber(rec[1])
    out[#out + 1] = id
    out[#out + 1] = rec[3]
    got = got + 1
  end
end
while got < k do
  local popped = redis.call('ZPOPMIN', pkey, k - got)
  if #popped == 0 then break end
  for i = 1, #popped, 2 do
    local id = popped[i]
    local key = prefix .. 'ev:' .. id
    local rec = redis.call('HMGET', key, 'state', 'claim', 'a1', 'a2', 'event', 'retry_at')
    local n = nil
    if tonumber(rec[2] or '0') == 0 then
      if rec[1] == 'pending' and not rec[3] then n = 1
      elseif rec[1] == 'retry_scheduled' and rec[3] and not rec[4]
          and now >= tonumber(rec[6] or '0') - 1 then n = 2
      elseif rec[1] == 'retry_scheduled' and rec[3] and not rec[4] then
        -- Its retry is not due yet: it stays parked (a pull never shortens the delay).
        later[#later + 1] = {popped[i + 1], id}
      end
    end
    if n then
      redis.call('HSET', key, 'claim', n, 'claimed_at', now_text, 'claim_id', token)
      redis.call('HDEL', key, 'wait', 'waiting_since')
      redis.call('SADD', mine, id)
      redis.call('ZADD', prefix .. 'due', lease_end, id)
      out[#out + 1] = n
      out[#out + 1] = id
      out[#out + 1] = rec[5]
      got = got + 1
    end
  end
end
for _, entry in ipairs(later) do redis.call('ZADD', pkey, entry[1], entry[2]) end
if got > 0 then redis.call('PEXPIRE', mine, math.max(1, math.ceil(lease * 1000))) end
local left = redis.call('ZCARD', pkey)
out[1] = left
if left == 0 then
  redis.call('ZREM', prefix .. 'idx:parked-activity', buyer)
else
  redis.call('ZADD', prefix .. 'idx:parked-activity', now, buyer)
end
return out
