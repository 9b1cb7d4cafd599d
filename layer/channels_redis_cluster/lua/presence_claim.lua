-- KEYS: the reaping marks (prefix -> claim end in ms, or 'done'), the leases; ARGV: now (ms), claim end (ms),
-- prefixes. Returns the prefixes this caller is to reap (only those whose lease is still ended), and those reaped.

local claimed, done = {}, {}
local now = tonumber(ARGV[1])
for i = 3, #ARGV do
  local mark = redis.call('HGET', KEYS[1], ARGV[i])
  local lease = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[i]) or now)
  if mark == 'done' then
    done[#done + 1] = ARGV[i]
  elseif lease <= now and (not mark or tonumber(mark) < now) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[2])
    claimed[#claimed + 1] = ARGV[i]
  end
end
return {claimed, done}
