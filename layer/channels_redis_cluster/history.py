"""Group history: a gapless offset and an epoch per group, its recent messages, and resuming from an offset.

Everything of a group lives in the group's slot: a hash with the top offset, the epoch, the server
process that wrote last and the highest offset published; a list of entries (the oldest first, so an
offset's index is derived from the top); and a sorted set of idempotency keys by offset.

A message is written by one script and published by another, and only once its primary's replicas hold
it (``WAIT`` between the two, see the layer's ``group_send``): a message any member received then
survives a failover, whatever the partition. The publishing script publishes, in offset order, every
entry after the highest one published up to the one asked, so the order on the shard channel is still
the order of offsets when senders on several processes finish their waits out of order. Reads show
entries up to the highest published only: an entry whose replication was never confirmed is never
answered as history, and may vanish with a primary cut off from its replicas.

The epoch changes whenever continuity may be lost: the hash is gone (expired, evicted, a node back
empty), or another server process than the last writer runs a script (failover, restart, resharding).
Each earlier epoch (up to 16) keeps the highest offset that is the same message in the current one, so
a client that stopped at or below it still resumes exactly. On such a change every entry the new server
holds counts as published: members that never got one live see the gap at the next message and read it.
"""

import fnmatch
import re
from typing import NamedTuple

from . import wire

# Lists whose entries start with their expiry time in milliseconds (13 ASCII digits), oldest first:
# channel queues and group histories.
DROP_EXPIRED = """
local function drop_expired(list, now)
  while true do
    local head = redis.call('LINDEX', list, 0)
    if not head or tonumber(string.sub(head, 1, 13)) > now then break end
    redis.call('LPOP', list)
  end
end
"""

# A group's normal channels (KEYS[n]) that joined after ``cutoff``: every group_send pushes to their
# queues, since normal channels live in Redis, not in any one process; older ones are dropped.
NORMAL_MEMBERS = """
local function normal_members(queues, cutoff)
  redis.call('ZREMRANGEBYSCORE', queues, '-inf', '(' .. cutoff)
  return redis.call('ZRANGE', queues, 0, -1)
end
"""

EPOCH_CHARS, OFFSET_CHARS = wire.EPOCH_CHARS, wire.OFFSET_CHARS
TIME_CHARS = 13
# Each entry: its expiry time (ms, TIME_CHARS digits), the frame header its sender made (wire.HEADER_BYTES:
# sender, sequence number, kind), then the message. Offsets and epochs are added when it is published.
ENTRY_BODY = TIME_CHARS + wire.HEADER_BYTES

# Keys of one group. KEYS[1]: the hash, KEYS[2]: the entries, KEYS[3]: the idempotency keys.
# ARGV[1] the writer's run id, ARGV[2] an epoch if a new one is needed, ARGV[3] now (ms), ARGV[4] the
# age bound (ms), ARGV[5] how long the hash outlives its last write (ms). Every script first brings the
# group up to date: create or rotate the epoch, and drop expired entries.
_PROLOGUE = (
    DROP_EXPIRED
    + f"""
local MAX_LINKS = 16
local TIME_CHARS, ENTRY_BODY = {TIME_CHARS}, {ENTRY_BODY}
"""
    + """
local meta, log, keys = KEYS[1], KEYS[2], KEYS[3]
local writer, fresh, now, age, keep = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local state = redis.call('HMGET', meta, 'top', 'epoch', 'writer', 'published')
local top, epoch, rotated = tonumber(state[1]), state[2], 0
local published = tonumber(state[4]) or top
if not top then
  redis.call('DEL', log, keys)
  top, epoch, rotated, published = 0, fresh, 1, 0
  redis.call('HSET', meta, 'top', 0, 'epoch', epoch, 'writer', writer, 'published', 0)
elseif state[3] ~= writer then
  -- Each earlier epoch keeps the highest offset that is the same message in the new one.
  local fields = redis.call('HGETALL', meta)
  local links, oldest, oldest_fork = 0, nil, nil
  for i = 1, #fields, 2 do
    if string.sub(fields[i], 1, 5) == 'link:' then
      local fork = math.min(tonumber(fields[i + 1]), top)
      redis.call('HSET', meta, fields[i], fork)
      links = links + 1
      if not oldest_fork or fork < oldest_fork then oldest, oldest_fork = fields[i], fork end
    end
  end
  if links >= MAX_LINKS then redis.call('HDEL', meta, oldest) end
  -- What this server holds counts as published: a member that missed an entry sees the gap and reads it.
  redis.call('HSET', meta, 'epoch', fresh, 'writer', writer, 'link:' .. epoch, top, 'published', top)
  epoch, rotated, published = fresh, 1, top
end
drop_expired(log, now)
"""
)

# A key's expiry is pushed out only when it is under ``ttl``, to 17/16 of it: the key still outlives every
# write by ``ttl`` at least, and replicas apply one PEXPIRE per sixteenth of ``ttl`` instead of one per message.
OUTLIVE = """
local function outlive(key, ttl)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl + math.floor(ttl / 16)) end
end
"""

# KEYS[4] the group's normal channels. ARGV[6] size, ARGV[7] shard channel, ARGV[8] frame header (sender,
# sequence number, kind), ARGV[9] body, ARGV[10] idempotency key or '', ARGV[11] the membership cutoff,
# ARGV[12] '1' to publish at once (nothing waits for replicas), else '0' (PUBLISH_SCRIPT publishes it).
# Returns {offset, epoch, rotated, duplicate, normal channels to push to}.
SEND_SCRIPT = (
    _PROLOGUE
    + NORMAL_MEMBERS
    + OUTLIVE
    + """
local size, channel, header, body, key = tonumber(ARGV[6]), ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local at_once = ARGV[12] == '1'
if key ~= '' then
  local seen = redis.call('ZSCORE', keys, key)
  if seen then
    -- Written already: only the sender's sequence number goes out, so no receiver counts a gap.
    if at_once then redis.call('SPUBLISH', channel, string.sub(header, 1, -2) .. 's') end
    return {tonumber(seen), epoch, rotated, 1, {}}
  end
end
top = top + 1
redis.call('RPUSH', log, string.format('%013d', now + age) .. header .. body)
local length = redis.call('LLEN', log)
if length > size then
  redis.call('LTRIM', log, length - size, -1)
  length = size
end
if key ~= '' then
  redis.call('ZADD', keys, top, key)
  outlive(keys, age)
end
redis.call('ZREMRANGEBYSCORE', keys, '-inf', top - length)
outlive(log, age)
outlive(meta, tonumber(keep))
if at_once then
  redis.call('HSET', meta, 'top', top, 'published', top)
  redis.call('SPUBLISH', channel, header .. epoch .. string.format('%016d', top) .. body)
else
  redis.call('HSET', meta, 'top', top)
end
return {top, epoch, rotated, 0, normal_members(KEYS[4], ARGV[11])}
"""
)

# ARGV[6] shard channel, ARGV[7] the offset to publish up to, ARGV[8] a frame to publish after them ('' for
# none: a duplicate's header, so receivers count no gap in its sender's sequence). Publishes, in order,
# every entry after the highest published up to ARGV[7]; each keeps the header its sender made.
# Returns how many entries it published.
PUBLISH_SCRIPT = (
    _PROLOGUE
    + """
local channel, upto, after = ARGV[6], math.min(tonumber(ARGV[7]), top), ARGV[8]
local sent = 0
if upto > published then
  local first = top - redis.call('LLEN', log) + 1
  local from = math.max(published + 1, first)
  if from <= upto then
    for i, entry in ipairs(redis.call('LRANGE', log, from - first, upto - first)) do
      redis.call('SPUBLISH', channel, string.sub(entry, TIME_CHARS + 1, ENTRY_BODY) .. epoch
        .. string.format('%016d', from + i - 1) .. string.sub(entry, ENTRY_BODY + 1))
      sent = sent + 1
    end
  end
  redis.call('HSET', meta, 'published', upto)
end
if after ~= '' then redis.call('SPUBLISH', channel, after) end
return sent
"""
)

# ARGV[6] since ('' for a fresh join), ARGV[7] the epoch of since, ARGV[8] how many of the latest
# entries a fresh join wants. Only published entries are shown: the top a reader learns is the highest one.
# Returns {top, epoch, first offset returned, recovered, rotated, entries}.
READ_SCRIPT = (
    _PROLOGUE
    + """
local since, since_epoch, last = tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8])
if rotated == 1 then redis.call('PEXPIRE', meta, keep) end
local first = top - redis.call('LLEN', log) + 1
local shown = published
local from, recovered
if not since then
  from, recovered = math.max(first, shown - last + 1), 1
else
  local fork = tonumber(redis.call('HGET', meta, 'link:' .. since_epoch))
  if since_epoch == epoch or (fork and since <= fork) then
    if since > shown then
      from, recovered = shown + 1, 0
    else
      from = math.max(first, since + 1)
      recovered = (from == since + 1) and 1 or 0
    end
  elseif fork then
    -- The client saw offsets past the fork that this server never got: they are lost.
    from, recovered = math.max(first, fork + 1), 0
  else
    from, recovered = first, 0
  end
end
local entries = {}
if from <= shown then entries = redis.call('LRANGE', log, from - first, shown - first) end
return {shown, epoch, from, recovered, rotated, entries}
"""
)

# Keys the layer adds to every group message that has an offset; namespaced so no app field is touched.
OFFSET = "__offset__"
EPOCH = "__epoch__"


class Bound(NamedTuple):
    """How much history a group keeps: ``size`` messages (0: none), none older than ``age`` seconds."""

    size: int
    age: float


class HistoryPolicy:
    """The bound of each group: the first matching glob pattern of ``group_history``, else the default."""

    CACHE_LIMIT = 10000

    def __init__(self, size, age, group_history):
        self.default = Bound(int(size), float(age))
        self.patterns = []
        for pattern, value in (group_history or {}).items():
            if not hasattr(pattern, "match"):
                pattern = re.compile(fnmatch.translate(pattern))
            if isinstance(value, dict):
                value = Bound(int(value.get("size", size)), float(value.get("age", age)))
            else:
                value = Bound(int(value), float(age))
            self.patterns.append((pattern, value))
        self._cache = {}

    def bound(self, group):
        """The ``Bound`` of ``group``."""
        if not self.patterns:
            return self.default
        bound = self._cache.get(group)
        if bound is None:
            bound = next((value for pattern, value in self.patterns if pattern.match(group)), self.default)
            if len(self._cache) >= self.CACHE_LIMIT:
                self._cache.clear()
            self._cache[group] = bound
        return bound


class GroupHistory(NamedTuple):
    """What ``group_history`` found: the messages to replay, the group's top and epoch, and whether it is exact.

    ``recovered`` is False when messages after ``since`` are missing (trimmed, expired, or lost with an
    epoch); ``messages`` then holds what is still there that the caller may not have seen.
    """

    messages: list
    offset: int
    epoch: str
    recovered: bool
