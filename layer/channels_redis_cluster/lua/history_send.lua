-- Writes a group message with history.
-- KEYS[1..3] as the prologue, KEYS[4] the group's normal channels.
-- ARGV[1..5] as the prologue; ARGV[6] size, ARGV[7] shard channel, ARGV[8] frame header (sender, sequence
-- number, kind), ARGV[9] body, ARGV[10] idempotency key or '', ARGV[11] the membership cutoff, ARGV[12]
-- '1' to publish at once (nothing waits for replicas), else '0' (history_publish publishes it).
-- Returns {offset, epoch, rotated, duplicate, normal channels to push to}.
--! include lib/history_prologue
--! include lib/normal_members
--! include lib/outlive

local size, channel, header, body, key = tonumber(ARGV[6]), ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local at_once = ARGV[12] == '1'
if key ~= '' then
  local seen = redis.call('ZSCORE', keys, key)
  if seen then
    -- Written already: only the sender's sequence number goes out, so no receiver counts a gap.
    if at_once then
      redis.call('SPUBLISH', channel, string.sub(header, 1, -2) .. SKIPPED)
    else
      -- One replicated write, so the WAIT after this script covers the first copy too: this connection may
      -- have written nothing since (a new one after a retry, another process resending the same key), and
      -- a WAIT over no write of its own confirms at once.
      redis.call('HSET', meta, 'top', top)
    end
    return {tonumber(seen), epoch, rotated, 1, {}}
  end
end
top = top + 1
redis.call('RPUSH', log, string.format(TIME_FORMAT, now + age) .. header .. body)
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
  redis.call('SPUBLISH', channel, header .. epoch .. string.format(OFFSET_FORMAT, top) .. body)
else
  redis.call('HSET', meta, 'top', top)
end
return {top, epoch, rotated, 0, normal_members(KEYS[4], ARGV[11])}
