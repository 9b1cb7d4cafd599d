-- Reads a group's history. KEYS[1..3], ARGV[1..5] as the prologue; ARGV[6] since ('' for a fresh join),
-- ARGV[7] the epoch of since, ARGV[8] how many of the latest entries a fresh join wants. Only published
-- entries are shown: the top a reader learns is the highest one.
-- Returns {top, epoch, first offset returned, recovered, rotated, entries}.
--! include lib/history_prologue

local since, since_epoch, last = tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8])
if rotated == 1 then redis.call('PEXPIRE', meta, keep) end
local first = top - redis.call('LLEN', log) + 1
local shown = published
local from, recovered
if not since then
  from, recovered = math.max(first, shown - last + 1), 1
else
  local fork = tonumber(redis.call('HGET', meta, 'link:' .. since_epoch))
  if since_epoch == epoch or (fork and since <= fork) then
    if since > shown then
      from, recovered = shown + 1, 0
    else
      from = math.max(first, since + 1)
      recovered = (from == since + 1) and 1 or 0
    end
  elseif fork then
    -- The client saw offsets past the fork that this server never got: they are lost.
    from, recovered = math.max(first, fork + 1), 0
  else
    from, recovered = first, 0
  end
end
local entries = {}
if from <= shown then entries = redis.call('LRANGE', log, from - first, shown - first) end
return {shown, epoch, from, recovered, rotated, entries}
