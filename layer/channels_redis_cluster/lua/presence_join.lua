-- KEYS[1] the group's entries; ARGV: channel, entry, expiry (s), shard channel, frame (or ''). The join and its event in one command.

redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
if ARGV[5] ~= '' then redis.call('SPUBLISH', ARGV[4], ARGV[5]) end
return 1
