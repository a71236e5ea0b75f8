"""The ledger (SPEC §6): every accepted event's state and attempts, kept in Redis.

The ledger is the source of truth; Celery messages are only triggers. Every state change
is one Lua script, so it is atomic however many workers, duplicate messages or sweepers
race on the same event. Keys (``P`` is the key prefix, ``cgrid:`` by default):

- ``P ev:<id>``        hash: event JSON, state, attempts ``a1``/``a2``, claim bookkeeping
- ``P due``            sorted set: id -> when the sweeper must look at it next
- ``P report:<day>``   hash: ``<buyer>\t<counter>`` -> count, per UTC day of ``created_at``
- ``P report:days``    sorted set of days that have counters
- ``P watermark:<queue>`` newest ``sent_at`` of any trigger a worker has started from that
                       broker queue (cgrid/routing.py)
- ``P parked:<buyer>`` sorted set: id -> created_at, attempts waiting for room in the
                       buyer's lane (claimed, then handed back unstarted: no attempt counted)
- ``P parked:activity`` sorted set: buyer -> when its parked set was last touched
- ``P failed:<day>:<buyer>`` set of the ids that ended ``failed``, for replay
- ``P open:<kind>``      events accepted and not yet final, per kind (the backlog)
- ``P poison``         the last poisoned messages dropped (``P poison:count`` counts all)
- ``P archive``        stream: every record that became final, until the archiver has written
                       it to disk (``cgrid/archive.py``); exists once an archiver has started

The one-retry guard is :data:`_CLAIM`: attempt ``n`` of an event can be claimed once,
attempt 2 only after attempt 1 failed, so no event is called more than twice.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis
from redis.commands.core import Script

from cgrid.errors import CgridError
from cgrid.event import Event
from cgrid.routing import DELIVER_QUEUE, Routing

PREFIX = "cgrid:"
CLAIM_WAIT_BACKOFF_S = 10.0  # after a claim found too few replicas, claims stop waiting this long
NO_BUYER = "-"
# Poisoned messages (worker/poison.py): a capped list of the last ones, and a counter.
POISON_LIST_KEY = PREFIX + "poison"
POISON_COUNT_KEY = PREFIX + "poison:count"


class NotReplicated(CgridError, redis.RedisError):
    """The primary took a write that fewer replicas than CGRID_REDIS_WAIT_REPLICAS hold.
    ``result`` is the script's answer; for an accept, ``withdrawn`` says whether its new
    events were all taken back (else some may still be delivered)."""

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result
        self.withdrawn = False


class State(StrEnum):
    PENDING = "pending"
    RETRY_SCHEDULED = "retry_scheduled"
    DELIVERED = "delivered"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"


TERMINAL_STATES = frozenset({State.DELIVERED, State.FAILED, State.REJECTED, State.EXPIRED})


class WaitReason(StrEnum):
    """Why an accepted event waits without being called (``status`` shows it)."""

    QUEUED = "queued"  # its trigger is on the queue, no worker has taken it yet
    IN_FLIGHT = "in_flight"  # a worker claimed the attempt and is making the call
    RETRY_DELAY = "retry_delay"  # its first attempt failed; the retry is not due yet
    LANE_FULL = "lane_full"  # its buyer's lane had no room: parked in Redis, called in turn
    PAUSED = "paused"  # its buyer is paused (buyers file): parked in Redis until resumed


WAIT_DETAILS = {
    WaitReason.QUEUED: "on the queue, waiting for a worker",
    WaitReason.IN_FLIGHT: "a worker is making the call",
    WaitReason.RETRY_DELAY: "the first attempt failed; the one retry waits for CGRID_RETRY_DELAY_S",
    WaitReason.LANE_FULL: "the buyer's lane is at its limit of calls in flight (or throttled while the "
                          "buyer fails): parked in Redis, called in creation order as the lane has room",
    WaitReason.PAUSED: "the buyer is paused in the buyers file: parked in Redis, called in creation order "
                       "once it is resumed (or expired at its maximum age)",
}


class Outcome(StrEnum):
    """What one attempt (or the decision not to make one) came to."""

    OK = "ok"
    UNEXPECTED = "unexpected"
    FAIL = "fail"
    REJECTED = "rejected"
    EXPIRED = "expired"


class Counter(StrEnum):
    EVENTS = "events"
    DELIVERED_FIRST = "delivered_first"
    DELIVERED_RETRY = "delivered_retry"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    UNEXPECTED = "unexpected"


@dataclass(frozen=True, slots=True)
class Park:
    """A claimed attempt handed back unstarted, to wait in its buyer's parked set."""

    event_id: str
    attempt_n: int
    created_at_s: float
    buyer: str
    reason: WaitReason = WaitReason.LANE_FULL
    claim_stamp: str = ""  # the claim's claimed_at, from claim() or pull() ('' = any claim)


@dataclass(frozen=True, slots=True)
class Finish:
    """The result of one claimed attempt, to be written by :meth:`Ledger.finish`."""

    event_id: str
    outcome: Outcome
    attempt_json: str = ""
    reason: str = ""
    retry_delay_s: float | None = None  # the buyer's, or None for CGRID_RETRY_DELAY_S
    duration_ms: float | None = None  # of the call, for the report's latency (None: no call)
    final_event: str = ""  # the event as a final record keeps it ('' = made by the script)


# Every script reads the time from Redis, so that hosts with skewed clocks still agree on
# retry delays and leases. (Scripts are replicated by effects, so TIME is allowed.)
_LUA_COMMON = """
local prefix = ARGV[1]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local function stamp(t) return string.format('%.6f', t) end
local now_text = stamp(now)
-- Report counters are summed in the script and written once per day and counter.
local bumps, bump_ttl = {}, 0
local function bump(day, buyer, counter, report_ttl)
  local fields = bumps[day]
  if not fields then fields = {}; bumps[day] = fields end
  local field = buyer .. '\\t' .. counter
  fields[field] = (fields[field] or 0) + 1
  bump_ttl = report_ttl
end
-- Events accepted and not yet final, per kind (P open:<kind>): the notices' backlog.
local open_delta = {}
local function opened(kind, delta)
  if kind then open_delta[kind] = (open_delta[kind] or 0) + delta end
end
-- A final record keeps what reconciliation needs: the user's data (user agent, IP chain)
-- goes at once, and so do the URL and macros (the host stays) unless the event failed or
-- expired uncalled, and may be replayed. An unreadable record is left as it is.
local function slim_event(text, keep_call)
  if not text then return nil end
  local ok, ev = pcall(cjson.decode, text)
  if not ok or type(ev) ~= 'table' then return text end
  ev['user_agent'] = nil
  ev['forwarded_for'] = nil
  if not keep_call and type(ev['url']) == 'string' then
    ev['host'] = string.match(ev['url'], '^%a+://([^/?#]*)')
    ev['url'] = nil
    ev['macros'] = nil
  end
  return cjson.encode(ev)
end
-- An event became final: it leaves the backlog, and its claim bookkeeping goes (a final
-- record needs none of it: 71 bytes of its ~600 in Redis).
local function closed(key)
  opened(redis.call('HGET', key, 'kind'), -1)
  redis.call('HDEL', key, 'claim', 'claimed_at', 'sent_at', 'retry_at')
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
-- The archive (cgrid/archive.py): every record that becomes final is also added to the
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
"""

# ARGV: prefix, the accept's time (accepted_at), then per event: id, day, buyer, kind.
# Takes back events an accept recorded that no replica holds (CGRID_REDIS_WAIT_REPLICAS):
# each still untouched (pending, never claimed, accepted at that time) is deleted and its
# counters undone, so an event the producer was told is not accepted is never called.
# Returns 1 (withdrawn) or 0 (already in use: it stays, and will be delivered) per event.
_WITHDRAW = _LUA_COMMON + """
local out = {}
for i = 3, #ARGV, 4 do
  local id, day, buyer, kind = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local key = prefix .. 'ev:' .. id
  local rec = redis.call('HMGET', key, 'state', 'claim', 'accepted_at', 'a1')
  if rec[1] == 'pending' and tonumber(rec[2] or '0') == 0 and rec[3] == ARGV[2] and not rec[4] then
    redis.call('DEL', key)
    redis.call('ZREM', prefix .. 'due', id)
    redis.call('INCRBY', prefix .. 'open:' .. kind, -1)
    redis.call('HINCRBY', prefix .. 'report:' .. day, buyer .. '\t' .. 'events', -1)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# ARGV: prefix, ledger_ttl, report_ttl, redeliver_after, then per event: id, day, buyer,
# event_json, kind. Returns the time, then 1 (accepted) or 0 (already known) per event.
_ACCEPT = _LUA_COMMON + """
local ttl, report_ttl, redeliver = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {now_text}
for i = 5, #ARGV, 5 do
  local id, day, buyer, kind = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 4]
  local key = prefix .. 'ev:' .. id
  if redis.call('EXISTS', key) == 1 then
    out[#out + 1] = 0
  else
    redis.call('HSET', key, 'event', ARGV[i + 3], 'state', 'pending', 'day', day,
      'buyer', buyer, 'kind', kind, 'accepted_at', now_text, 'sent_at', now_text, 'claim', 0)
    opened(kind, 1)
    -- No expiry while the event is open: its record must outlive any wait (a fleet down for
    -- longer than the ledger TTL must still find it, end it and archive it). It expires
    -- CGRID_LEDGER_TTL_S after it becomes final.
    redis.call('ZADD', prefix .. 'due', now + redeliver, id)
    bump(day, buyer, 'events', report_ttl)
    out[#out + 1] = 1
  end
end
write_bumps()
return out
"""

# ARGV: prefix, attempt n, lease_s, sent_at (of the trigger, by this clock), the queue the
# trigger came from, ids...
# Claims attempt n of each id that may have it; returns {id, event_json, ...} of the claimed.
_CLAIM = _LUA_COMMON + """
local n, lease, sent_at = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local wm_key = prefix .. 'watermark:' .. ARGV[5]
local wm = tonumber(redis.call('GET', wm_key) or '0')
-- (never past this script's own time: a trigger stamped in the future must not make every
-- older trigger of its queue look lost)
if sent_at > wm then
  if sent_at > now then redis.call('SET', wm_key, now_text) else redis.call('SET', wm_key, ARGV[4]) end
end
local out = {}
local seen, parked = {}, {}
for i = 6, #ARGV do
  local id = ARGV[i]
  local key = prefix .. 'ev:' .. id
  local rec = redis.call('HMGET', key, 'state', 'claim', 'a1', 'a2', 'retry_at', 'event', 'wait', 'buyer')
  local state, claim = rec[1], tonumber(rec[2] or '0')
  local ok = false
  -- A parked event (wait set) is claimed by its lane's pull, never by a stray trigger.
  if claim == 0 and not rec[7] then
    if n == 1 then
      ok = state == 'pending' and not rec[3]
    else
      ok = state == 'retry_scheduled' and rec[3] and not rec[4]
        and now >= tonumber(rec[5] or '0') - 1
    end
  end
  if ok then
    redis.call('HSET', key, 'claim', n, 'claimed_at', now_text)
    redis.call('ZADD', prefix .. 'due', now + lease, id)
    out[#out + 1] = id
    out[#out + 1] = rec[6]
    local buyer = rec[8]
    if buyer and not seen[buyer] then
      seen[buyer] = true
      if redis.call('EXISTS', prefix .. 'parked:' .. buyer) == 1 then parked[#parked + 1] = buyer end
    end
  end
end
-- Then this claim's stamp (its claimed_at: a park must show it, see _PARK), and the claimed
-- events' buyers that have parked events: their lanes must pull them (a worker that parked
-- them may be gone) and let new events wait behind them.
out[#out + 1] = '|'
out[#out + 1] = now_text
for _, buyer in ipairs(parked) do out[#out + 1] = buyer end
return out
"""

# ARGV: prefix, attempt n, ledger_ttl, report_ttl, retry_delay, then per event:
# id, outcome, attempt_json, reason, the buyer's retry delay ('' = the default), the call's
# latency bucket ('' = no call), and the event as its final record keeps it ('' = made here).
# Returns the new state per event ('' if not ours).
_FINISH = _LUA_COMMON + """
local n, ttl, report_ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local default_delay = tonumber(ARGV[5])
local due = prefix .. 'due'
local out = {}
for i = 6, #ARGV, 7 do
  local id, outcome, attempt, reason = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local delay = tonumber(ARGV[i + 4]) or default_delay
  local bucket, final_event = ARGV[i + 5], ARGV[i + 6]
  local key = prefix .. 'ev:' .. id
  local rec = redis.call('HMGET', key, 'state', 'claim', 'day', 'buyer', 'a1', 'a2')
  local state, claim, day, buyer = rec[1], tonumber(rec[2] or '0'), rec[3], rec[4]
  local new = ''
  local akey = 'a' .. n
  if claim == n then
    redis.call('HSET', key, 'claim', 0)
    if attempt ~= '' then redis.call('HSET', key, akey, attempt) end
    if outcome == 'ok' or outcome == 'unexpected' then
      new = 'delivered'
      bump(day, buyer, n == 1 and 'delivered_first' or 'delivered_retry', report_ttl)
      if outcome == 'unexpected' then bump(day, buyer, 'unexpected', report_ttl) end
    elseif outcome == 'fail' and n == 1 then
      new = 'retry_scheduled'
      redis.call('HSET', key, 'retry_at', stamp(now + delay))
      redis.call('HDEL', key, 'sent_at')
      redis.call('ZADD', due, now + delay, id)
    elseif outcome == 'fail' then
      new = 'failed'
      bump(day, buyer, 'failed', report_ttl)
      note_failed(day, buyer, id, ttl)
    else
      new = outcome
      redis.call('HSET', key, 'reason', reason)
      bump(day, buyer, outcome, report_ttl)
      if outcome == 'expired' then note_failed(day, buyer, id, ttl) end
    end
  elseif n == 1 and (outcome == 'ok' or outcome == 'unexpected') and state == 'retry_scheduled'
      and claim == 0 and not rec[6] and rec[5] and string.find(rec[5], '"error":"lost"', 1, true) then
    -- The sweeper gave this attempt up for lost, but it did succeed: keep the truth and
    -- cancel the retry, so a success is never followed by a second call.
    new = 'delivered'
    redis.call('HSET', key, akey, attempt)
    bump(day, buyer, 'delivered_first', report_ttl)
    if outcome == 'unexpected' then bump(day, buyer, 'unexpected', report_ttl) end
  end
  if new ~= '' then
    if bucket ~= '' then bump(day, buyer, 'lat_' .. bucket, report_ttl) end
    redis.call('HSET', key, 'state', new)
    if new ~= 'retry_scheduled' then
      redis.call('ZREM', due, id)
      closed(key)
      -- (the worker made it keeping the URL for a failed or an expired event)
      if final_event ~= '' and (new == 'failed' or new == 'expired') == (outcome == 'fail' or outcome == 'expired') then
        redis.call('HSET', key, 'event', final_event)
      else
        finalize(key, redis.call('HGET', key, 'event'), new)
      end
      redis.call('EXPIRE', key, ttl)
      archive(key, id, new)
    end
  end
  out[#out + 1] = new
end
write_bumps()
return out
"""

# ARGV: prefix, then per event: id, attempt n, created_at, buyer, reason, the claim's stamp
# ('' = any claim of attempt n).
# Hands claimed attempts back unstarted: the claim is released, no attempt is recorded, and
# the event waits in its buyer's parked set. Returns 1 (parked) or 0 (not ours) per event.
_PARK = _LUA_COMMON + """
local out = {}
for i = 2, #ARGV, 6 do
  local id, n, buyer, reason, stamp = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  local key = prefix .. 'ev:' .. id
  local rec = redis.call('HMGET', key, 'claim', 'claimed_at')
  -- Only the claim this park was made for: a park sent again after a lost reply must not
  -- take back the claim of the process that has pulled the event since.
  if tonumber(rec[1] or '0') == n and (stamp == '' or rec[2] == stamp) then
    redis.call('HSET', key, 'claim', 0, 'wait', reason, 'waiting_since', now_text)
    redis.call('ZREM', prefix .. 'due', id)
    redis.call('ZADD', prefix .. 'parked:' .. buyer, tonumber(ARGV[i + 2]), id)
    redis.call('ZADD', prefix .. 'parked:activity', now, buyer)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# ARGV: prefix, buyer, k, lease. Claims the next attempt of up to k parked events of the
# buyer, oldest first. Returns {left in the parked set, then n, id, event_json per claim}.
_PULL = _LUA_COMMON + """
local buyer, k, lease = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local pkey = prefix .. 'parked:' .. buyer
local out = {0, now_text}  -- how many stay parked, this pull's stamp (claimed_at), then claims
local got = 0
local later = {}
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
      redis.call('HSET', key, 'claim', n, 'claimed_at', now_text)
      redis.call('HDEL', key, 'wait', 'waiting_since')
      redis.call('ZADD', prefix .. 'due', now + lease, id)
      out[#out + 1] = n
      out[#out + 1] = id
      out[#out + 1] = rec[5]
      got = got + 1
    end
  end
end
for _, entry in ipairs(later) do redis.call('ZADD', pkey, entry[1], entry[2]) end
local left = redis.call('ZCARD', pkey)
out[1] = left
if left == 0 then
  redis.call('ZREM', prefix .. 'parked:activity', buyer)
else
  redis.call('ZADD', prefix .. 'parked:activity', now, buyer)
end
return out
"""

# ARGV: prefix, limit, redeliver_after, retry_delay, report_ttl, deliver queue, revive_after,
# revive_batch, ledger_ttl, retry queue, the number of buyers with queues of their own, then
# per such buyer: its id, its first-attempt queue and its retry queue; then per paused buyer:
# its id and maximum event age. Looks at events whose due time has passed, and at parked sets
# no worker has touched for revive_after (their workers are gone): a few of those are sent
# again as triggers. A paused buyer's parked events are left alone, but those past its
# maximum age end `expired`.
# Returns {time, number of sections, then per section: attempt n, queue, count, ids...}.
_SWEEP = _LUA_COMMON + """
local limit, redeliver = tonumber(ARGV[2]), tonumber(ARGV[3])
local delay, report_ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local revive_after, revive_batch, ledger_ttl = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local default_queue = {ARGV[6], ARGV[10]}
local routed, n_routed = {}, tonumber(ARGV[11])
for i = 12, 11 + 3 * n_routed, 3 do routed[ARGV[i]] = {ARGV[i + 1], ARGV[i + 2]} end
local function queue_of(buyer, n)
  return (routed[buyer] or default_queue)[n]
end
-- Per queue, read once: is it empty, and the newest sent_at of a trigger a worker started
-- from it. Queues are FIFO, so a trigger older than one already started (by more than
-- redeliver) was lost; another queue's progress says nothing about it.
local queues = {}
local function trigger_lost(queue, sent_at)
  local q = queues[queue]
  if not q then
    q = {redis.call('LLEN', queue) == 0, tonumber(redis.call('GET', prefix .. 'watermark:' .. queue) or '0')}
    queues[queue] = q
  end
  return q[1] or q[2] > sent_at + redeliver
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
local own_delay, delays_at = {}, 12 + 3 * n_routed
local n_delays = tonumber(ARGV[delays_at])
for i = delays_at + 1, delays_at + 2 * n_delays, 2 do own_delay[ARGV[i]] = tonumber(ARGV[i + 1]) end
local paused = {}
for i = delays_at + 1 + 2 * n_delays, #ARGV, 2 do
  local buyer, max_age = ARGV[i], tonumber(ARGV[i + 1])
  paused[buyer] = true
  local pkey = prefix .. 'parked:' .. buyer
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', pkey, '-inf', now - max_age, 'LIMIT', 0, limit)) do
    local key = prefix .. 'ev:' .. id
    local rec = redis.call('HMGET', key, 'state', 'claim', 'day', 'event')
    if tonumber(rec[2] or '0') == 0 and (rec[1] == 'pending' or rec[1] == 'retry_scheduled') then
      redis.call('HSET', key, 'state', 'expired',
        'reason', 'past its maximum age of ' .. max_age .. 's while its buyer was paused')
      redis.call('HDEL', key, 'wait', 'waiting_since')
      closed(key)
      finalize(key, rec[4], 'expired')
      redis.call('ZREM', prefix .. 'due', id)
      redis.call('EXPIRE', key, ledger_ttl)
      bump(rec[3], buyer, 'expired', report_ttl)
      note_failed(rec[3], buyer, id, ledger_ttl)
      archive(key, id, 'expired')
    end
    redis.call('ZREM', pkey, id)
  end
end
local due = prefix .. 'due'
local ids = redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(ids) do
  local key = prefix .. 'ev:' .. id
  local rec = redis.call('HMGET', key, 'state', 'claim', 'claimed_at', 'sent_at', 'day', 'buyer', 'event')
  local state, claim = rec[1], tonumber(rec[2] or '0')
  if not state or (state ~= 'pending' and state ~= 'retry_scheduled') then
    redis.call('ZREM', due, id)
  elseif claim ~= 0 then
    -- The attempt was claimed but never finished in its lease: its worker died. It
    -- counts as a failed attempt (SPEC §5).
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
      closed(key)
      finalize(key, rec[7], 'failed')
      redis.call('EXPIRE', key, ledger_ttl)
      bump(rec[5], rec[6], 'failed', report_ttl)
      note_failed(rec[5], rec[6], id, ledger_ttl)
      archive(key, id, 'failed')
    end
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
local activity = prefix .. 'parked:activity'
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
write_bumps()
local out = {now_text, #sections}
for _, section in ipairs(sections) do
  out[#out + 1] = section[1]
  out[#out + 1] = section[2]
  out[#out + 1] = #section - 2
  for j = 3, #section do out[#out + 1] = section[j] end
end
return out
"""


def _num(value: float) -> str:
    return repr(float(value))


def day_of(created_at_s: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(created_at_s))


class Ledger:
    """Typed access to the ledger scripts; one instance per process is enough."""

    def __init__(self, client: redis.Redis, *, prefix: str = PREFIX, wait_replicas: int = 0,
                 wait_timeout_ms: int = 1000) -> None:
        self.client = client
        self.prefix = prefix
        # With replicas (Sentinel), an accept counts only once this many replicas hold it
        # (Redis WAIT), so a failover cannot lose an accepted event; a claim's call waits for
        # them too, so a failover cannot forget a claim whose call is made (a third call).
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.replica_shortfalls = 0  # claims and pulls that went ahead short of their replicas
        self._claims_wait_again_at = 0.0
        self._accept = client.register_script(_ACCEPT)
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)
        self._sweep = client.register_script(_SWEEP)
        self._park = client.register_script(_PARK)
        self._pull = client.register_script(_PULL)
        self._withdraw = client.register_script(_WITHDRAW)

    def accept(
        self, events: list[Event], *, ledger_ttl_s: int, report_ttl_s: int, redeliver_after_s: float
    ) -> tuple[float, list[bool]]:
        """Record new events as ``pending``. Returns the ledger's time (the trigger's
        ``sent_at``) and, per event, False for an id the ledger already holds."""
        args: list[Any] = [self.prefix, ledger_ttl_s, report_ttl_s, _num(redeliver_after_s)]
        for event in events:
            args += [event.id, day_of(event.created_at_s), event.buyer or NO_BUYER, event.to_json(), event.kind.value]
        try:
            now, *flags = self._replicated(self._accept, args, "accepted")
        except NotReplicated as e:
            now, *flags = e.result
            e.withdrawn = self._withdraw_unreplicated(events, _text(now), flags)
            raise
        return float(_text(now)), [bool(flag) for flag in flags]

    def _withdraw_unreplicated(self, events: list[Event], accepted_at: str, flags: list[Any]) -> bool:
        """Take back the events an accept just recorded (those it found new) that no replica
        holds; True when every one of them is withdrawn (none can be called)."""
        args: list[Any] = [self.prefix, accepted_at]
        for event, is_new in zip(events, flags, strict=True):
            if int(is_new):
                args += [event.id, day_of(event.created_at_s), event.buyer or NO_BUYER, event.kind.value]
        if len(args) == 2:
            return True
        try:
            return all(int(flag) for flag in self._withdraw(args=args))
        except redis.RedisError:
            return False

    def claim(
        self, ids: list[str], attempt: int, *, lease_s: float, sent_at_s: float,
        parked_buyers: list[str] | None = None, queue: str = DELIVER_QUEUE, stamp: list[str] | None = None,
    ) -> list[tuple[str, str]]:
        """Claim attempt ``attempt`` of each id; returns (id, event JSON) of those won. The
        won events' buyers that have parked events are added to ``parked_buyers``. ``queue``
        is the broker queue the trigger came from (its watermark moves). ``stamp`` receives
        the claim's stamp, which a park of these attempts must show (:class:`Park`)."""
        if not ids:
            return []
        args: list[str | int] = [self.prefix, attempt, _num(lease_s), _num(sent_at_s), queue, *ids]
        flat = [_text(item) for item in self._replicated(self._claim, args, "claimed", required=False)]
        split = flat.index("|")
        if stamp is not None:
            stamp.append(flat[split + 1])
        if parked_buyers is not None:
            parked_buyers += flat[split + 2:]
        return list(zip(flat[0:split:2], flat[1:split:2], strict=True))

    def finish(
        self, results: list[Finish], attempt: int, *, ledger_ttl_s: int, report_ttl_s: int,
        retry_delay_s: float,
    ) -> list[str]:
        """Write the outcomes of claimed attempts; returns each event's new state."""
        if not results:
            return []
        args: list[Any] = [self.prefix, attempt, ledger_ttl_s, report_ttl_s, _num(retry_delay_s)]
        for result in results:
            delay = "" if result.retry_delay_s is None else _num(result.retry_delay_s)
            bucket = "" if result.duration_ms is None else latency_bucket(result.duration_ms)
            args += [result.event_id, result.outcome.value, result.attempt_json, result.reason, delay, bucket,
                     result.final_event]
        return [_text(state) for state in self._finish(args=args)]

    def _replicated(self, script: Script, args: list[Any], what: str, *, required: bool = True) -> Any:
        """Run ``script``; with ``wait_replicas``, wait (WAIT, on the same connection) until
        that many replicas hold its writes. Short of them after the timeout: an accept raises
        :class:`NotReplicated` (the events are not counted as accepted); a claim or a pull
        goes ahead (its call is made) and is counted in ``replica_shortfalls``: stopping
        every call while a lone primary runs would hold back billing notices already
        accepted, and a claim can only be forgotten by a failover to a replica that lacks it."""
        if not self.wait_replicas or (not required and time.monotonic() < self._claims_wait_again_at):
            return script(args=args)
        pipe = self.client.pipeline(transaction=False)
        script(args=args, client=pipe)
        pipe.wait(self.wait_replicas, self.wait_timeout_ms)
        result, replicas = pipe.execute()
        if int(replicas) < self.wait_replicas:
            if required:
                raise NotReplicated(
                    f"{what} by the Redis primary but held by {replicas} of the {self.wait_replicas} replica(s) "
                    f"CGRID_REDIS_WAIT_REPLICAS asks for, after {self.wait_timeout_ms} ms", result,
                )
            # WAIT does not return early when replicas are missing: claims and pulls stop
            # waiting for a while rather than each losing the whole timeout.
            self.replica_shortfalls += 1
            self._claims_wait_again_at = time.monotonic() + CLAIM_WAIT_BACKOFF_S
        return result

    def park(self, parks: list[Park]) -> list[bool]:
        """Hand claimed attempts back unstarted, to wait in their buyer's parked set."""
        if not parks:
            return []
        args: list[Any] = [self.prefix]
        for park in parks:
            args += [park.event_id, park.attempt_n, _num(park.created_at_s), park.buyer, park.reason.value,
                     park.claim_stamp]
        return [bool(flag) for flag in self._park(args=args)]

    def pull(self, buyer: str, k: int, *, lease_s: float,
             stamp: list[str] | None = None) -> tuple[int, list[tuple[int, str, str]]]:
        """Claim the next attempt of up to ``k`` parked events of ``buyer``, oldest first.
        Returns how many stay parked and (attempt n, id, event JSON) per claim; ``stamp``
        receives the claims' stamp, as for :meth:`claim`."""
        left, pull_stamp, *flat = self._replicated(self._pull, [self.prefix, buyer, k, _num(lease_s)], "pulled",
                                                   required=False)
        if stamp is not None:
            stamp.append(_text(pull_stamp))
        items = [(int(flat[i]), _text(flat[i + 1]), _text(flat[i + 2])) for i in range(0, len(flat), 3)]
        return int(left), items

    def sweep(
        self, *, limit: int, redeliver_after_s: float, retry_delay_s: float, report_ttl_s: int,
        routing: Routing, revive_after_s: float = 10.0, revive_batch: int = 10, ledger_ttl_s: int = 2700,
        paused: Mapping[str, float] | None = None, retry_delays: Mapping[str, float] | None = None,
    ) -> tuple[float, dict[str, list[str]], dict[str, list[str]]]:
        """Handle events whose due time passed, and revive parked sets no worker touched for
        ``revive_after_s``. Returns the ledger's time and the ids whose trigger must be
        (re)sent, per queue (``routing``), for attempt 1 and for attempt 2."""
        routed = routing.buyer_queues
        args: list[str | int] = [self.prefix, limit, _num(redeliver_after_s), _num(retry_delay_s),
                                 report_ttl_s, routing.deliver_queue, _num(revive_after_s), revive_batch,
                                 ledger_ttl_s, routing.retry_queue, len(routed)]
        for buyer, (first_queue, retry_queue) in routed.items():
            args += [buyer, first_queue, retry_queue]
        args.append(len(retry_delays or {}))
        for buyer, delay_s in (retry_delays or {}).items():
            args += [buyer, _num(delay_s)]
        for buyer, max_age_s in (paused or {}).items():
            args += [buyer, _num(max_age_s)]
        now, sections, *flat = self._sweep(args=args)
        sends: tuple[dict[str, list[str]], dict[str, list[str]]] = ({}, {})
        at = 0
        for _ in range(int(sections)):
            attempt_n, queue, count = int(flat[at]), _text(flat[at + 1]), int(flat[at + 2])
            sends[attempt_n - 1].setdefault(queue, []).extend(_text(i) for i in flat[at + 3:at + 3 + count])
            at += 3 + count
        return float(_text(now)), sends[0], sends[1]

    def record(self, event_id: str) -> dict[str, Any] | None:
        """The ledger record as the ``status`` command prints it; None if unknown."""
        raw = self.client.hgetall(self.prefix + "ev:" + event_id)
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        attempts = [json_or_raw(fields[key]) for key in ("a1", "a2") if key in fields]
        record: dict[str, Any] = {
            "id": event_id,
            "state": fields.get("state"),
            "attempts": attempts,
            "event": json_or_raw(fields.get("event", "null")),
            "accepted_at": float(fields.get("accepted_at", "0")),
        }
        if fields.get("claim", "0") != "0":
            record["in_flight_attempt"] = int(fields["claim"])
        if "retry_at" in fields and fields.get("state") == State.RETRY_SCHEDULED:
            record["retry_at"] = float(fields["retry_at"])
        if fields.get("reason"):
            record["reason"] = fields["reason"]
        if fields.get("replayed_as"):
            record["replayed_as"] = fields["replayed_as"].split(" ")
        if any(isinstance(a, dict) and a.get("unexpected_status") for a in attempts):
            record["unexpected_status"] = True  # as the report counts it
        waiting = _wait_reason(fields, now_s=time.time())
        if waiting is not None:
            record["waiting"] = {"reason": waiting.value, "detail": WAIT_DETAILS[waiting]}
            if waiting in (WaitReason.LANE_FULL, WaitReason.PAUSED):
                buyer = fields.get("buyer", NO_BUYER)
                record["waiting"]["buyer"] = buyer
                record["waiting"]["since"] = float(fields.get("waiting_since", "0"))
        return record

    def failed_ids(self, day: str, buyer: str) -> list[str]:
        """The events of ``buyer`` created on ``day`` that ended ``failed`` or ``expired``
        (uncalled: its buyer was down or paused too long), sorted: what replay sends."""
        return sorted(_text(i) for i in self.client.smembers(f"{self.prefix}failed:{day}:{buyer}"))

    def note_replay(self, event_id: str, replay_id: str) -> None:
        """Link the original to the new event that replays it (``status`` shows it)."""
        key = self.prefix + "ev:" + event_id
        replays = self.client.hget(key, "replayed_as")
        listed = [] if not replays else _text(replays).split(" ")
        if replay_id not in listed:
            self.client.hset(key, "replayed_as", " ".join([*listed, replay_id]))

    def open_events(self) -> dict[str, int]:
        """Events accepted and not yet final, per kind (``nurl``, ``burl``)."""
        values = self.client.mget([f"{self.prefix}open:nurl", f"{self.prefix}open:burl"])
        return {"nurl": int(values[0] or 0), "burl": int(values[1] or 0)}

    def backlog(self) -> tuple[int, dict[str, int]]:
        """Events in the due set (queued, in flight, retry waiting), and parked per buyer."""
        buyers = [_text(b) for b in self.client.zrange(self.prefix + "parked:activity", 0, -1)]
        pipe = self.client.pipeline(transaction=False)
        pipe.zcard(self.prefix + "due")
        for buyer in buyers:
            pipe.zcard(self.prefix + "parked:" + buyer)
        due, *parked = pipe.execute()
        return int(due), dict(zip(buyers, map(int, parked), strict=True))

    def archive_backlog(self) -> tuple[int, float] | None:
        """Final records not yet archived (the archive stream's length) and the age in
        seconds of the oldest (by its entry id, Redis's clock); None when the archive is off
        (no archiver ever made the stream)."""
        key = self.prefix + "archive"
        pipe = self.client.pipeline(transaction=False)
        pipe.exists(key)
        pipe.xlen(key)
        pipe.xrange(key, count=1)
        pipe.time()
        exists, length, first, (now_s, now_us) = pipe.execute()
        if not exists:
            return None
        oldest_s = 0.0
        if first:
            entry_ms = int(_text(first[0][0]).split("-")[0])
            oldest_s = max(0.0, int(now_s) + int(now_us) / 1e6 - entry_ms / 1000)
        return int(length), oldest_s

    def poisoned(self) -> int:
        """How many poisoned messages workers have dropped."""
        return int(self.client.get(POISON_COUNT_KEY) or 0)

    def report(self, days: int | None = None, *, day: str | None = None,
               buyer: str | None = None) -> list[dict[str, Any]]:
        """Counters per buyer and day, newest day first, with the calls' p50/p99 latency
        (the upper bound of the bucket that holds it, in ms; None without calls)."""
        if day is not None:
            day_keys = [day] if self.client.zscore(self.prefix + "report:days", day) is not None else []
        else:
            day_keys = [_text(d) for d in self.client.zrevrange(
                self.prefix + "report:days", 0, -1 if days is None else days - 1)]
        rows: list[dict[str, Any]] = []
        for day_key in day_keys:
            per_buyer: dict[str, dict[str, Any]] = {}
            buckets: dict[str, dict[str, int]] = {}
            for field, count in self.client.hgetall(self.prefix + "report:" + day_key).items():
                row_buyer, _, counter = _text(field).rpartition("\t")
                if buyer is not None and row_buyer != buyer:
                    continue
                row = per_buyer.setdefault(
                    row_buyer, {"day": day_key, "buyer": row_buyer, **{c.value: 0 for c in Counter}}
                )
                if counter.startswith("lat_"):
                    buckets.setdefault(row_buyer, {})[counter[4:]] = int(count)
                else:
                    row[counter] = int(count)
            for row_buyer, row in per_buyer.items():
                row["calls_timed"] = sum(buckets.get(row_buyer, {}).values())
                row["p50_ms"] = bucket_percentile(buckets.get(row_buyer, {}), 0.50)
                row["p99_ms"] = bucket_percentile(buckets.get(row_buyer, {}), 0.99)
            rows += [per_buyer[b] for b in sorted(per_buyer)]
        return rows


# Upper bounds (ms) of the report's latency buckets, about 1.5x apart: a percentile read
# from them is the bound of the bucket that holds it. A call cannot outlast its deadline
# (timeout_s is at most 60 s), so the last bucket is the end.
LATENCY_BUCKETS_MS = (1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 500, 700,
                      1000, 1500, 2000, 3000, 5000, 7000, 10000, 15000, 20000, 30000, 60000)


def latency_bucket(duration_ms: float) -> str:
    """The name of the bucket a call's duration falls in (its upper bound in ms)."""
    for bound in LATENCY_BUCKETS_MS:
        if duration_ms <= bound:
            return str(bound)
    return str(LATENCY_BUCKETS_MS[-1])


def bucket_percentile(counts: dict[str, int], q: float) -> float | None:
    """The upper bound of the bucket holding the q-th call (nearest rank); None if none."""
    total = sum(counts.values())
    if not total:
        return None
    rank = max(1, math.ceil(total * q))
    seen = 0
    for bound in LATENCY_BUCKETS_MS:
        seen += counts.get(str(bound), 0)
        if seen >= rank:
            return float(bound)
    return float(LATENCY_BUCKETS_MS[-1])


def _wait_reason(fields: dict[str, str], now_s: float) -> WaitReason | None:
    """Why a non-terminal event is not being called right now."""
    state = fields.get("state")
    if state not in (State.PENDING, State.RETRY_SCHEDULED):
        return None
    if fields.get("claim", "0") != "0":
        return WaitReason.IN_FLIGHT
    if fields.get("wait"):
        return WaitReason(fields["wait"]) if fields["wait"] in WaitReason._value2member_map_ else None
    if state == State.RETRY_SCHEDULED and now_s < float(fields.get("retry_at", "0")):
        return WaitReason.RETRY_DELAY
    return WaitReason.QUEUED


def json_or_raw(text: str) -> Any:
    """Decoded JSON; a corrupt value is shown as it is rather than breaking ``status``."""
    try:
        return json.loads(text)
    except ValueError:
        return {"unreadable": text[:1000]}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
