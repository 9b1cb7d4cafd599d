-- Gives one socket's place back. KEYS[1]: the identity's sockets; ARGV[1] the socket's member. Returns 1 if it held one.

return redis.call('ZREM', KEYS[1], ARGV[1])
