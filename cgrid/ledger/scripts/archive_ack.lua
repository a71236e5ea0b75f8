#!lua flags=allow-oom
-- archive_ack: takes entries an archiver has written to disk off the archive stream, in one
-- step: deletes and acknowledges them, and takes their records off P archive:records (the
-- records waiting, that the scripts add to with each `lines` entry). `allow-oom`: a full
-- Redis must still drain its archive.
-- KEYS:  none (key names are built from the prefix: archive, archive:records)
-- ARGV:  prefix, the archivers' group, how many records the `lines` entries among them hold,
--        then the entries' ids
-- Reply: how many records stay waiting (P archive:records)
local stream = prefix .. 'archive'
local records_key = prefix .. 'archive:records'
local ids = {}
for i = 4, #ARGV do ids[#ids + 1] = ARGV[i] end
for start = 1, #ids, 1000 do
  local last = math.min(start + 999, #ids)
  redis.call('XDEL', stream, unpack(ids, start, last))
  redis.call('XACK', stream, ARGV[2], unpack(ids, start, last))
end
local taken = tonumber(ARGV[3])
local left = 0
if taken > 0 then
  left = redis.call('DECRBY', records_key, taken)
  if left < 0 then  -- (the key was lost or edited by hand: it restarts from none)
    redis.call('SET', records_key, 0)
    left = 0
  end
else
  left = tonumber(redis.call('GET', records_key) or '0')
end
return left
