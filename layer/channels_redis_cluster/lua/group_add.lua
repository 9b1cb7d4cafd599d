-- Membership: sorted sets of channel -> join time that expire with group_expiry. KEYS[1] has every
-- member, KEYS[2] the normal ones. ARGV[1] now (s), ARGV[2] the channel, ARGV[3] group_expiry (s), ARGV[4]
-- 1 for a normal channel, else 0. Returns 1.

for i = 1, 1 + tonumber(ARGV[4]) do
  redis.call('ZADD', KEYS[i], ARGV[1], ARGV[2])
  redis.call('EXPIRE', KEYS[i], ARGV[3])
end
return 1
