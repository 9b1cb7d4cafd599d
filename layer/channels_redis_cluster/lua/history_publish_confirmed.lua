-- Sent in the same write as the history_send it follows, after the connection's WAIT: publishes that send's
-- entry, and every one before it not published yet, in order, if the replicas hold this connection's writes.
-- WAIT called from a script answers at once how many replicas acknowledged every write of the calling
-- connection (Valkey 8 and later; Redis refuses or counts every replica there: the layer sends this to Valkey only).
-- An entry is found by how it starts, among the newest: entries written since it come after it.
-- KEYS[1] the history's hash, KEYS[2] its entries. ARGV[1] shard channel, ARGV[2] replicas wanted, ARGV[3]
-- the entry's start as history_send wrote it (expiry time, then the frame header: sender, sequence number,
-- kind), ARGV[4] '1' in the last such script of the write.
-- Returns how many entries it published; -1 when the replicas have not confirmed the writes (nothing is
-- published); -2 when the entry is not among the newest (a duplicate send wrote none; the caller publishes
-- by offset).
--! include lib/publish_pending

local SEARCHED = 16

local wanted = tonumber(ARGV[2])
if redis.call('WAIT', wanted, 0) < wanted then return -1 end
local meta, log, channel, start = KEYS[1], KEYS[2], ARGV[1], ARGV[3]
local state = redis.call('HMGET', meta, 'top', 'epoch', 'published')
local top, epoch = tonumber(state[1]), state[2]
if not top then return -2 end
local published = tonumber(state[3]) or top
-- A replica's own 'published' is never read (a promoted one rotates the epoch and takes all it holds as
-- published), so it is not replicated, but by the last script of the write: a replicated write here moves
-- this connection's offset, and the next script's WAIT would count replicas against a write of its own.
-- The last one's is replicated on purpose: a replica's connection to its primary has Nagle's algorithm on
-- (TCP_NODELAY off, read from valkey-server 9.1.2's socket), so its acknowledgement right after another one
-- waits for the primary's delayed TCP ACK (40 ms) unless the primary sends it something first. Without this
-- write one send in 50 took 40 ms (p99 40 ms against 3 ms with it, 540 sends/s over 60 rooms).
if ARGV[4] ~= '1' then redis.set_repl(redis.REPL_NONE) end
local newest = redis.call('LRANGE', log, -SEARCHED, -1)
for i = #newest, 1, -1 do
  if string.sub(newest[i], 1, ENTRY_BODY) == start then
    return publish_pending(meta, log, channel, epoch, top, published, top - #newest + i)
  end
end
return -2
