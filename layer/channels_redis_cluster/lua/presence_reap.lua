-- KEYS[1] a group's entries; ARGV[1] a dead process's prefix. Removes that process's channels (owner as owner_of reads it).

local prefix, removed = ARGV[1], 0
local dotted = '.' .. prefix
for _, channel in ipairs(redis.call('HKEYS', KEYS[1])) do
  local bang = string.find(channel, '!', 1, true)
  if bang then
    local head = string.sub(channel, 1, bang - 1)
    if head == prefix or string.sub(head, -#dotted) == dotted then
      removed = removed + redis.call('HDEL', KEYS[1], channel)
    end
  end
end
return removed
