-- The start of every group history script: brings the group up to date (creates or rotates the epoch,
-- drops expired entries). KEYS[1] the hash (top, epoch, writer, published, link:<epoch>), KEYS[2] the
-- entries, KEYS[3] the idempotency keys. ARGV[1] the writer's run id, ARGV[2] an epoch if a new one is
-- needed, ARGV[3] now (ms), ARGV[4] the age bound (ms), ARGV[5] how long the hash outlives its last write
-- (ms). Defines meta, log, keys, writer, fresh, now, age, keep, top, epoch, rotated, published.
--! include lib/drop_expired

local MAX_LINKS = 16

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
