-- Holds a place for one socket of an identity, or says which limit it is at.
-- KEYS[1]: the identity's sockets, members "<room> <channel>" scored by when their token ends (ms).
-- ARGV[1] now (ms), ARGV[2] this socket's member, ARGV[3] its token's end (ms), ARGV[4] its room,
-- ARGV[5] most rooms, ARGV[6] most sockets.
-- Returns 0 when the socket was added, 1 when the identity is in its most rooms, 2 at its most sockets.

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
if #members >= tonumber(ARGV[6]) then return 2 end
local rooms, count = {}, 0
for _, member in ipairs(members) do
  local room = string.match(member, '^(%S+) ')
  if not rooms[room] then rooms[room] = true; count = count + 1 end
end
if not rooms[ARGV[4]] and count >= tonumber(ARGV[5]) then return 1 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
return 0
