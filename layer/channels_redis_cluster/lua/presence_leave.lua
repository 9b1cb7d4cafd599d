-- KEYS[1] the group's entries; ARGV: shard channel, frame, then the channels to remove. Publishes only what it removed.

local removed = 0
for i = 3, #ARGV do removed = removed + redis.call('HDEL', KEYS[1], ARGV[i]) end
if removed > 0 and ARGV[2] ~= '' then redis.call('SPUBLISH', ARGV[1], ARGV[2]) end
return removed
