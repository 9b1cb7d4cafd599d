-- Drops the expired heads of a list whose entries start with their expiry time (ms, TIME_CHARS digits),
-- oldest first: channel queues and group histories.

local function drop_expired(list, now)
  while true do
    local head = redis.call('LINDEX', list, 0)
    if not head or tonumber(string.sub(head, 1, TIME_CHARS)) > now then break end
    redis.call('LPOP', list)
  end
end
