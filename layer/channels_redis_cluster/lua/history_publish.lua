-- Publishes, in order, every entry after the highest published up to ARGV[7]; each keeps the header its
-- sender made. KEYS[1..3], ARGV[1..5] as the prologue; ARGV[6] shard channel, ARGV[7] the offset to publish
-- up to, ARGV[8] a frame to publish after them ('' for none: a duplicate's header, so receivers count no
-- gap in its sender's sequence). Returns how many entries it published.
--! include lib/history_prologue
--! include lib/publish_pending

local channel, upto, after = ARGV[6], math.min(tonumber(ARGV[7]), top), ARGV[8]
local sent = publish_pending(meta, log, channel, epoch, top, published, upto)
if after ~= '' then redis.call('SPUBLISH', channel, after) end
return sent
