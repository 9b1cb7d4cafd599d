-- KEYS[1] every member, KEYS[2] the normal ones; ARGV[1] the channel. Returns 1.

redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
