-- KEYS[1] the group's entries; ARGV: expiry (s), then channel, entry pairs. Writes the missing ones; returns their channels.

local restored = {}
for i = 2, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then restored[#restored + 1] = ARGV[i] end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return restored
