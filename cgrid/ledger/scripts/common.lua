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
-- A number given to redis.call is formatted with %.17g at each call: a value used for many
-- events is formatted once, as that same text.
local function num_text(x) return string.format('%.17g', x) end
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
-- uncalled, and may be replayed. It is cut out of the event's JSON text, never
-- decoded and encoded again: cjson writes 14 significant digits (1.2345678901234567 became
-- 1.2345678901235, and a replay sent that), so what is kept stays byte for byte. An
-- unreadable record is left as it is.
local function json_string_end(text, i)  -- text[i] is the opening quote
  local j = i + 1
  while true do
    local q = string.find(text, '["\\]', j)
    if not q then return nil end
    if string.byte(text, q) == 34 then return q end  -- '"'
    j = q + 2  -- a backslash escapes the next character
  end
end
local function json_value_end(text, i)
  local c = string.sub(text, i, i)
  if c == '"' then return json_string_end(text, i) end
  if c ~= '[' and c ~= '{' then
    local q = string.find(text, '[,}%]]', i)  -- a number, true, false or null
    return q and q - 1
  end
  local depth, j = 0, i
  while true do
    local q = string.find(text, '[%[%]{}"]', j)
    if not q then return nil end
    local d = string.sub(text, q, q)
    if d == '"' then
      q = json_string_end(text, q)
      if not q then return nil end
    elseif d == '[' or d == '{' then
      depth = depth + 1
    else
      depth = depth - 1
      if depth == 0 then return q end
    end
    j = q + 1
  end
end
-- The members of the JSON object whose '{' is text[i], in order, each as {name, its text
-- ("name":value), where its value starts}; nil when it is not a JSON object.
local function object_members(text, i)
  local _, j = string.find(text, '^{%s*', i)
  if not j then return nil end
  j = j + 1
  local members = {}
  while string.sub(text, j, j) == '"' do
    local name_end = json_string_end(text, j)
    if not name_end then return nil end
    local _, colon = string.find(text, '^%s*:%s*', name_end + 1)
    if not colon then return nil end
    local value_end = json_value_end(text, colon + 1)
    if not value_end then return nil end
    members[#members + 1] = {string.sub(text, j + 1, name_end - 1), string.sub(text, j, value_end), colon + 1}
    local _, sep_at, sep = string.find(text, '^%s*([,}])%s*', value_end + 1)
    if not sep then return nil end
    if sep == '}' then return members end
    j = sep_at + 1
  end
  if string.sub(text, j, j) == '}' then return members end
  return nil
end
-- The event's JSON text without the members a final record drops (their names are plain
-- ASCII: the event's fields); nil when the text is not a JSON object.
local dropped_always = {user_agent = true, forwarded_for = true}
local reconcile_macros = {AUCTION_ID = true, AUCTION_IMP_ID = true}
local function slim_event_text(text, keep_call)
  local ok, decoded = pcall(cjson.decode, text)
  if not ok or type(decoded) ~= 'table' then return nil end
  local _, brace = string.find(text, '^%s*{')
  if not brace then return nil end
  local members = object_members(text, brace)
  if not members then return nil end
  local kept = {}
  for _, member in ipairs(members) do
    local name = member[1]
    if dropped_always[name] then
      -- never kept
    elseif keep_call or (name ~= 'url' and name ~= 'macros') then
      kept[#kept + 1] = member[2]
    elseif name == 'macros' and string.sub(text, member[3], member[3]) == '{' then
      local ids = {}
      for _, macro in ipairs(object_members(text, member[3]) or {}) do
        if reconcile_macros[macro[1]] then ids[#ids + 1] = macro[2] end
      end
      if #ids > 0 then kept[#kept + 1] = '"macros":{' .. table.concat(ids, ',') .. '}' end
    end
  end
  if not keep_call and type(decoded['url']) == 'string' then
    local host = string.match(decoded['url'], '^%a+://([^/?#]*)')
    if host then kept[#kept + 1] = '"host":' .. cjson.encode(host) end
  end
  return '{' .. table.concat(kept, ',') .. '}'
end
local function slim_event(text, keep_call)
  if not text then return nil end
  return slim_event_text(text, keep_call) or text
end
-- An event became final: it leaves the backlog, and its claim bookkeeping goes (a final
-- record needs none of it: 71 bytes of its ~600 in Redis). ``has``: what the caller knows
-- the record holds of it: 'none' (a first attempt a shared claim took off the list, with no
-- claim fields: claim.lua), 'claim' (claim fields, no sent_at nor retry_at), or nil (any):
-- a field the hash lacks costs HDEL a search of the whole record.
local function closed(key, kind, has)
  opened(kind, -1)
  if has == 'none' then return end
  if has == 'claim' then
    redis.call('HDEL', key, 'claim', 'claimed_at', 'claim_id')
  else
    redis.call('HDEL', key, 'claim', 'claimed_at', 'claim_id', 'sent_at', 'retry_at')
  end
end
-- A first attempt a shared trigger's claim took off its pending list has no claim fields
-- (claim.lua): it is open while its record is as the claim left it — pending, no attempt,
-- not parked (wait), not sent again by id (sent_at). The finish, park and sweep scripts
-- know such an attempt by this and by its claim's token.
local function open_off_list(state, a1, wait, sent_at)
  return state == 'pending' and not a1 and not wait and not sent_at
end
-- Claims under a lease (claim.lua): counts the attempts a script ended or handed back, per
-- claim (token -> how many), off its lease; a lease with none open goes. ``known``: every
-- token is known to have a lease (else one without is skipped: a pull's, or an old claim's).
local function count_off_leases(ended, known)
  for token, count in pairs(ended) do
    local lease_key = prefix .. 'lease:' .. token
    if (known or redis.call('EXISTS', lease_key) == 1) and redis.call('HINCRBY', lease_key, 'open', -count) <= 0 then
      redis.call('DEL', lease_key)
      redis.call('ZREM', prefix .. 'leases', token)
      redis.call('ZREM', prefix .. 'leases:shared', token)
    end
  end
end
-- The final record's event made from the event's text (nil: none), and whether that text
-- is readable JSON (an unreadable one is kept as it is).
local function final_event_of(event_text, state)
  if not event_text then return nil, true end
  local slim = slim_event_text(event_text, state == 'failed' or state == 'expired')
  if slim then return slim, true end
  return event_text, false
end
local function finalize(key, event_text, state)
  local slim, readable = final_event_of(event_text, state)
  if slim then redis.call('HSET', key, 'event', slim) end
  return slim, readable
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
-- without an archiver must not fill Redis). An entry is one field, `line`: its archive
-- line's JSON without the leading `{"entry":...,` (the archiver puts that in front), made
-- here from what the script already holds; the archiver checks it is JSON before writing.
-- Archivers that read such entries say so in P archive:format ('line'); until one has, the
-- entries keep the previous format, a field per value (which every archiver reads), so a
-- fleet upgraded before its archivers loses no record. Archivers that read batches say
-- 'lines': then one script adds one entry for all the records it made final (the stream's
-- writes, reads, acknowledgements and deletions, one per record, were a fifth of Redis's
-- work per event), and adds their number to P archive:records (the records waiting: the
-- archiver's acknowledgement takes them off). Its fields: `lines` = the script's time (the
-- records' finished_at), then a pair per record: its line (the archiver puts the entry in
-- front) = '', or, for a line the worker made (finish.lua), the line's part before
-- accepted_at, a newline and its part after finished_at = the record's accepted_at (the
-- archiver puts the two times between the parts: no Lua string work for such a record).
local archive_key = prefix .. 'archive'
local archive_on, archive_lines, archive_batch = nil, false, false
local batch_lines = {}
local function archive_enabled()
  if archive_on == nil then
    archive_on = redis.call('EXISTS', archive_key) == 1
    if archive_on then
      local format = redis.call('GET', prefix .. 'archive:format')
      archive_lines = format == 'line' or format == 'lines'
      archive_batch = format == 'lines'
    end
  end
  return archive_on
end
-- Adds this script's batch of lines to the stream: the scripts that archive (finish.lua,
-- sweep.lua) call it at their end.
local function flush_archive()
  local records = #batch_lines / 2
  if records == 0 then return end
  for start = 1, #batch_lines, 2000 do  -- (at most 1000 records an entry: Lua's stack bounds unpack)
    redis.call('XADD', archive_key, '*', 'lines', now_text,
      unpack(batch_lines, start, math.min(start + 1999, #batch_lines)))
  end
  redis.call('INCRBY', prefix .. 'archive:records', records)
end
-- The line a worker made of a record it delivered (batch entries only: see above).
local function archive_made(parts, accepted_at)
  batch_lines[#batch_lines + 1] = parts
  batch_lines[#batch_lines + 1] = accepted_at
end
-- Ids and buyers are printable ASCII (cgrid/event.py): only a quote or a backslash needs
-- escaping (plain finds, cheaper than a pattern); reasons may hold anything. Days, kinds
-- and times are the ledger's own (a corrupt one makes the line fail the archiver's check).
local function json_id(text)
  if not string.find(text, '"', 1, true) and not string.find(text, '\\', 1, true) then
    return '"' .. text .. '"'
  end
  return cjson.encode(text)
end
local function json_string(text)
  if not string.find(text, '[%c"\\\128-\255]') then return '"' .. text .. '"' end
  return cjson.encode(text)
end
local function json_number(text)
  if text and tonumber(text) then return text end
  return 'null'
end
-- ``event_readable`` false: the event's text is not JSON; the line shows it as
-- {"unreadable": its first 1000 bytes}, as `cgrid-s2s status` does.
local function archive_line(id, state, day, buyer, kind, accepted_at, a1, a2, reason, event, event_readable)
  if not archive_enabled() then return end
  if not archive_lines then
    redis.call('XADD', archive_key, '*', 'id', id, 'state', state, 'day', day or '', 'buyer', buyer or '',
      'kind', kind or '', 'accepted_at', accepted_at or '', 'finished_at', now_text, 'a1', a1 or '', 'a2', a2 or '',
      'reason', reason or '', 'event', event or '')
    return
  end
  local attempts
  if a1 and a1 ~= '' and a2 and a2 ~= '' then attempts = a1 .. ',' .. a2
  elseif a1 and a1 ~= '' then attempts = a1
  elseif a2 and a2 ~= '' then attempts = a2
  else attempts = '' end
  local reason_part = ''
  if reason and reason ~= '' then reason_part = ',"reason":' .. json_string(reason) end
  local event_part = 'null'
  if event and event ~= '' then
    if event_readable then event_part = event
    else event_part = '{"unreadable":' .. cjson.encode(string.sub(event, 1, 1000)) .. '}' end
  end
  local line = '"id":' .. json_id(id) .. ',"state":"' .. state ..
    '","day":"' .. (day or '') .. '","buyer":' .. json_id(buyer or '') .. ',"kind":"' .. (kind or '') ..
    '","accepted_at":' .. json_number(accepted_at) .. ',"finished_at":' .. now_text ..
    ',"attempts":[' .. attempts .. ']' .. reason_part .. ',"event":' .. event_part .. '}'
  if archive_batch then
    batch_lines[#batch_lines + 1] = line
    batch_lines[#batch_lines + 1] = ''
  else
    redis.call('XADD', archive_key, '*', 'line', line)
  end
end
-- The archive line of a record read back from its hash (the sweep's final records).
local function archive(key, id, state, event_readable)
  if not archive_enabled() then return end
  local r = redis.call('HMGET', key, 'day', 'buyer', 'kind', 'accepted_at', 'a1', 'a2', 'reason', 'event')
  archive_line(id, state, r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], event_readable ~= false)
end
-- The counters a script summed (open events per kind, report counters per day), written
-- once at its end. (A script that archives calls flush_archive() first.)
local function write_bumps()
  for kind, delta in pairs(open_delta) do redis.call('INCRBY', prefix .. 'open:' .. kind, delta) end
  for day, fields in pairs(bumps) do
    local key = prefix .. 'report:' .. day
    for field, count in pairs(fields) do redis.call('HINCRBY', key, field, count) end
    redis.call('EXPIRE', key, bump_ttl)
    redis.call('ZADD', prefix .. 'report:days', tonumber((string.gsub(day, '-', ''))), day)
  end
end
