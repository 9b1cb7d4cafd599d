-- KEYS: the leases, the reaping marks; ARGV: now (ms), this process's lease end (ms), its prefix, how long an
-- ended lease is kept (ms). Returns whether this process's lease had ended or was missing, then the
-- processes whose lease ended: their entries are hidden until removed.

local now = tonumber(ARGV[1])
local before = redis.call('ZSCORE', KEYS[1], ARGV[3])
local lost = 0
if not before or tonumber(before) < now then
  lost = 1
  redis.call('HDEL', KEYS[2], ARGV[3])
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
for _, prefix in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[4]))) do
  redis.call('ZREM', KEYS[1], prefix)
  redis.call('HDEL', KEYS[2], prefix)
end
local ended = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
table.insert(ended, 1, lost)
return ended
