-- Normal-channel push: drops expired heads, refuses at capacity, appends, refreshes the key's TTL.
-- KEYS[1] the channel's list. ARGV[1] now (ms), ARGV[2] capacity, ARGV[3] TTL (ms), ARGV[4] the entry
-- (its expiry time, TIME_CHARS digits, then the message). Returns 1, or 0 when full.
--! include lib/drop_expired

local key = KEYS[1]
local now = tonumber(ARGV[1])
drop_expired(key, now)
if redis.call('LLEN', key) >= tonumber(ARGV[2]) then return 0 end
redis.call('RPUSH', key, ARGV[4])
redis.call('PEXPIRE', key, ARGV[3])
return 1
