-- Publishes, in order, every entry after the highest published up to ARGV[7]; each keeps the header its
-- sender made. KEYS[1..3], ARGV[1..5] as the prologue; ARGV[6] shard channel, ARGV[7] the offset to publish
-- up to, ARGV[8] a frame to publish after them ('' for none: a duplicate's header, so receivers count no
-- gap in its sender's sequence). Returns how many entries it published.
--! include lib/history_prologue

local channel, upto, after = ARGV[6], math.min(tonumber(ARGV[7]), top), ARGV[8]
local sent = 0
if upto > published then
  local first = top - redis.call('LLEN', log) + 1
  local from = math.max(published + 1, first)
  if from <= upto then
    for i, entry in ipairs(redis.call('LRANGE', log, from - first, upto - first)) do
      redis.call('SPUBLISH', channel, string.sub(entry, TIME_CHARS + 1, ENTRY_BODY) .. epoch
        .. string.format(OFFSET_FORMAT, from + i - 1) .. string.sub(entry, ENTRY_BODY + 1))
      sent = sent + 1
    end
  end
  redis.call('HSET', meta, 'published', upto)
end
if after ~= '' then redis.call('SPUBLISH', channel, after) end
return sent
