-- A group message without history: one SPUBLISH reaches the processes that hold members; the group's
-- normal channels come back, for the sender to push to. KEYS[1] the normal channels. ARGV[1] the shard
-- channel, ARGV[2] the frame, ARGV[3] the membership cutoff. Returns the normal channels.
--! include lib/normal_members

redis.call('SPUBLISH', ARGV[1], ARGV[2])
return normal_members(KEYS[1], ARGV[3])
