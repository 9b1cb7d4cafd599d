-- Publishes, in order, the entries of ``log`` after offset ``published`` up to offset ``upto`` (``top`` the
-- newest entry's offset), each with the header its sender made, and marks them published in ``meta``.
-- Returns how many it published.

local function publish_pending(meta, log, channel, epoch, top, published, upto)
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
  return sent
end
