-- KEYS: the reaping marks, the leases, the reaped process's group set; ARGV: now (ms), its prefix. Marks it reaped
-- unless its lease was renewed meanwhile (it came back: its mark goes, so its next death is reaped too).

local lease = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[2]) or ARGV[1])
if lease > tonumber(ARGV[1]) then
  redis.call('HDEL', KEYS[1], ARGV[2])
  return 0
end
redis.call('HSET', KEYS[1], ARGV[2], 'done')
redis.call('DEL', KEYS[3])
return 1
