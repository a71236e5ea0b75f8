-- The prelude of every ledger script: cgrid/ledger/__init__.py puts this file in front of
-- each operation's script (after its first line, when that line is a `#!lua` shebang).
-- It reads ARGV[1] (the key prefix, `cgrid:` by default) and the time, from Redis: every
-- script reads the time there, so that hosts with skewed clocks still agree on retry delays
-- and leases (scripts are replicated by effects, so TIME is allowed). It defines the helpers
-- the operations share: report counters, the backlog per kind, a final record's slimming,
-- the replay sets, the archive stream.
local prefix = ARGV[1]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local function stamp(t) return string.format('%.6f', t) end
local now_text = stamp(now)
-- Report counters are summed in the script and written once per day and counter.
local bumps, bump_ttl = {}, 0
local function bump(day, buyer, counter, report_ttl, delta)
  local fields = bumps[day]
  if not fields then fields = {}; bumps[day] = fields end
  local field = buyer .. '\t' .. counter
  fields[field] = (fields[field] or 0) + (delta or 1)
  bump_ttl = report_ttl
end
-- Events accepted and not yet final, per kind (P open:<kind>): the notices' backlog.
local open_delta = {}
local function opened(kind, delta)
  if kind then open_delta[kind] = (open_delta[kind] or 0) + delta end
end
-- A final record keeps what reconciliation needs: the user's data (user agent, IP chain)
-- goes at once, and so do the URL and macros (the host stays, and the AUCTION_ID and
-- AUCTION_IMP_ID macros, cgrid.macros.RECONCILE_MACROS) unless the event failed or expired
-- uncalled, and may be replayed. An unreadable record is left as it is.
local function slim_event(text, keep_call)
  if not text then return nil end
  local ok, ev = pcall(cjson.decode, text)
  if not ok or type(ev) ~= 'table' then return text end
  ev['user_agent'] = nil
  ev['forwarded_for'] = nil
  if not keep_call and type(ev['url']) == 'string' then
    ev['host'] = string.match(ev['url'], '^%a+://([^/?#]*)')
    ev['url'] = nil
    local m = ev['macros']
    ev['macros'] = nil
    if type(m) == 'table' and (m['AUCTION_ID'] ~= nil or m['AUCTION_IMP_ID'] ~= nil) then
      ev['macros'] = {AUCTION_ID = m['AUCTION_ID'], AUCTION_IMP_ID = m['AUCTION_IMP_ID']}
    end
  end
  return cjson.encode(ev)
end
-- An event became final: it leaves the backlog, and its claim bookkeeping goes (a final
-- record needs none of it: 71 bytes of its ~600 in Redis).
local function closed(key)
  opened(redis.call('HGET', key, 'kind'), -1)
  redis.call('HDEL', key, 'claim', 'claimed_at', 'claim_id', 'sent_at', 'retry_at')
end
local function finalize(key, event_text, state)
  local slim = slim_event(event_text, state == 'failed' or state == 'expired')
  if slim then redis.call('HSET', key, 'event', slim) end
end
-- Failed and expired events by day and buyer, for replay (cgrid-s2s replay --buyer B --day D).
local function note_failed(day, buyer, id, ttl)
  local key = prefix .. 'failed:' .. day .. ':' .. buyer
  redis.call('SADD', key, id)
  redis.call('EXPIRE', key, ttl)
end
-- The archive (archive/files.py): every record that becomes final is also added to the
-- stream P archive, in the same script, so no final state can miss it. The stream exists
-- once an archiver has made its consumer group; before that nothing is added (a fleet
-- without an archiver must not fill Redis). Every entry has the same fields in the same
-- order, so Redis stores their names once per stream node.
local archive_key = prefix .. 'archive'
local archive_on = nil
local function archive(key, id, state)
  if archive_on == nil then archive_on = redis.call('EXISTS', archive_key) == 1 end
  if not archive_on then return end
  local r = redis.call('HMGET', key, 'day', 'buyer', 'kind', 'accepted_at', 'a1', 'a2', 'reason', 'event')
  redis.call('XADD', archive_key, '*', 'id', id, 'state', state, 'day', r[1] or '', 'buyer', r[2] or '',
    'kind', r[3] or '', 'accepted_at', r[4] or '', 'finished_at', now_text, 'a1', r[5] or '', 'a2', r[6] or '',
    'reason', r[7] or '', 'event', r[8] or '')
end
local function write_bumps()
  for kind, delta in pairs(open_delta) do redis.call('INCRBY', prefix .. 'open:' .. kind, delta) end
  for day, fields in pairs(bumps) do
    local key = prefix .. 'report:' .. day
    for field, count in pairs(fields) do redis.call('HINCRBY', key, field, count) end
    redis.call('EXPIRE', key, bump_ttl)
    redis.call('ZADD', prefix .. 'report:days', tonumber((string.gsub(day, '-', ''))), day)
  end
end
