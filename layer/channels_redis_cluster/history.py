"""Group history: a gapless offset and an epoch per group, its recent messages, and resuming from an offset.

Everything of a group lives in the group's slot: a hash with the top offset, the epoch and the server
process that wrote last; a list of entries (the oldest first, so an offset's index is derived from the
top); and a sorted set of idempotency keys by offset. ``group_send`` runs one script that numbers,
appends, trims and SPUBLISHes atomically, so the order on the shard channel is the order of offsets.

The epoch changes whenever continuity may be lost: the hash is gone (expired, evicted, a node back
empty), or another server process than the last writer runs the script (failover, restart, resharding).
Un-replicated writes lost in a failover would otherwise hand their offsets out again under the same
epoch. Each earlier epoch (up to 16) keeps the highest offset that is the same message in the current
one, so a client that stopped at or below it still resumes exactly.
"""

import fnmatch
import re
from typing import NamedTuple

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

# Keys of one group. KEYS[1]: the hash, KEYS[2]: the entries, KEYS[3]: the idempotency keys.
# ARGV[1] the writer's run id, ARGV[2] an epoch if a new one is needed, ARGV[3] now (ms), ARGV[4] the
# age bound (ms), ARGV[5] how long the hash outlives its last write (ms). Both scripts first bring the
# group up to date: create or rotate the epoch, and drop expired entries.
_PROLOGUE = DROP_EXPIRED + """
local MAX_LINKS = 16
local meta, log, keys = KEYS[1], KEYS[2], KEYS[3]
local writer, fresh, now, age, keep = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local state = redis.call('HMGET', meta, 'top', 'epoch', 'writer')
local top, epoch, rotated = tonumber(state[1]), state[2], 0
if not top then
  redis.call('DEL', log, keys)
  top, epoch, rotated = 0, fresh, 1
  redis.call('HSET', meta, 'top', 0, 'epoch', epoch, 'writer', writer)
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
  redis.call('HSET', meta, 'epoch', fresh, 'writer', writer, 'link:' .. epoch, top)
  epoch, rotated = fresh, 1
end
drop_expired(log, now)
"""

# A key's expiry is pushed out only when it is under ``ttl``, to 17/16 of it: the key still outlives every
# write by ``ttl`` at least, and replicas apply one PEXPIRE per sixteenth of ``ttl`` instead of one per message.
OUTLIVE = """
local function outlive(key, ttl)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl + math.floor(ttl / 16)) end
end
"""

# KEYS[4] the group's normal channels. ARGV[6] size, ARGV[7] shard channel, ARGV[8] frame prefix (sender,
# sequence number, kind), ARGV[9] body, ARGV[10] idempotency key or '', ARGV[11] the membership cutoff.
# Returns {offset, epoch, rotated, duplicate, normal channels to push to}.
SEND_SCRIPT = _PROLOGUE + NORMAL_MEMBERS + OUTLIVE + """
local size, channel, prefix, body, key = tonumber(ARGV[6]), ARGV[7], ARGV[8], ARGV[9], ARGV[10]
if key ~= '' then
  local seen = redis.call('ZSCORE', keys, key)
  if seen then
    -- Published already: only the sender's sequence number goes out, so no receiver counts a gap.
    redis.call('SPUBLISH', channel, string.sub(prefix, 1, -2) .. 's')
    return {tonumber(seen), epoch, rotated, 1, {}}
  end
end
top = top + 1
redis.call('HSET', meta, 'top', top)
redis.call('RPUSH', log, string.format('%013d', now + age) .. body)
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
redis.call('SPUBLISH', channel, prefix .. epoch .. string.format('%016d', top) .. body)
return {top, epoch, rotated, 0, normal_members(KEYS[4], ARGV[11])}
"""

# ARGV[6] since ('' for a fresh join), ARGV[7] the epoch of since, ARGV[8] how many of the latest
# entries a fresh join wants. Returns {top, epoch, first offset returned, recovered, rotated, entries}.
READ_SCRIPT = _PROLOGUE + """
local since, since_epoch, last = tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8])
if rotated == 1 then redis.call('PEXPIRE', meta, keep) end
local first = top - redis.call('LLEN', log) + 1
local from, recovered
if not since then
  from, recovered = math.max(first, top - last + 1), 1
else
  local fork = tonumber(redis.call('HGET', meta, 'link:' .. since_epoch))
  if since_epoch == epoch or (fork and since <= fork) then
    if since > top then
      from, recovered = top + 1, 0
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
return {top, epoch, from, recovered, rotated, redis.call('LRANGE', log, from - first, -1)}
"""

EPOCH_CHARS = 16
OFFSET_CHARS = 16
TIME_CHARS = 13
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
