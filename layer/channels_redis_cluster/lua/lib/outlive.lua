-- A key's expiry is pushed out only when it is under ``ttl``, to 17/16 of it: the key still outlives every
-- write by ``ttl`` at least, and replicas apply one PEXPIRE per sixteenth of ``ttl`` instead of one per message.

local function outlive(key, ttl)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl + math.floor(ttl / 16)) end
end
