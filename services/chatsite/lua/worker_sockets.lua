-- Records how many WebSockets one worker holds and returns every worker's count that is still fresh.
-- KEYS[1]: the deployment's hash of reports, field = worker id,
--   value = "<sockets> <expires at, ms> <first reported at, ms>".
-- ARGV[1] this worker's id, ARGV[2] its open WebSockets (-1: it stops, remove its report),
-- ARGV[3] milliseconds a report stays fresh.
-- Returns a flat list: worker id, sockets, milliseconds since it first reported, worker id, ...
-- (this worker included unless removed). Times are the node's clock, so workers on hosts whose clocks
-- differ agree on them.

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local life = tonumber(ARGV[3])
if tonumber(ARGV[2]) < 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  local since = now
  local old = redis.call('HGET', KEYS[1], ARGV[1])
  if old then
    local expires, first = string.match(old, '^%d+ (%d+) (%d+)$')
    if expires and tonumber(expires) > now then since = tonumber(first) end
  end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. (now + life) .. ' ' .. since)
end
local fresh = {}
local reports = redis.call('HGETALL', KEYS[1])
for i = 1, #reports, 2 do
  local sockets, expires, first = string.match(reports[i + 1], '^(%d+) (%d+) (%d+)$')
  if expires and tonumber(expires) > now then
    fresh[#fresh + 1] = reports[i]
    fresh[#fresh + 1] = sockets
    fresh[#fresh + 1] = now - tonumber(first)
  else
    redis.call('HDEL', KEYS[1], reports[i])
  end
end
redis.call('PEXPIRE', KEYS[1], life * 2)
return fresh
